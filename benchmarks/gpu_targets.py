"""Every Triton kernel variant the triton backend can launch, compiled ahead of time for real
GPU targets on a machine without a GPU: registers, spills, shared memory, the occupancy they
allow, and the byte model's step time at each GPU's memory bandwidth.

Triton compiles with the ptxas it ships, so ``triton.compile(ASTSource(fn, signature,
constexprs), target=GPUTarget("cuda", cc, 32))`` gives a cubin here, and the cuobjdump it
ships reads its resource usage. The variants are not listed by hand: each launcher of
``kernels/`` (``stats``, ``refine``, ``update``) is called with every input the driver
(``agip/backends/fused.py``) can give it, on tiny CPU tensors, with its kernel replaced by a
recorder; each launch's argument types and constexpr values are the variant. A kernel is a
``@triton.jit`` function of ``kernels/`` with a ``*_ptr`` argument (the others are helpers
such as ``score``); one that no launcher reached is an error, as is a compile error or a
register spill, so a new kernel or constexpr is covered (or reported) without editing this
file's tables or its test. Integer arguments are compiled unspecialised (Triton's launch-time
specialisation on multiples of 16 only adds alignment hints).

    python benchmarks/gpu_targets.py                  # every variant x sm_75, sm_80, sm_90
    python benchmarks/gpu_targets.py --cover          # a covering subset (what the default test runs)
    python benchmarks/gpu_targets.py --targets 80 --json /tmp/x.json --md /tmp/x.md
"""
from __future__ import annotations

import os

# compiling needs real JIT functions: under the interpreter triton.jit returns something else
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402

import _checkout  # noqa: E402,F401  (this checkout's agip, its root off sys.path)
from agip.config import FISHER_POWERS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# the GPUs of each target (per-SM limits of the CUDA occupancy calculator; memory bandwidth
# from the vendors' data sheets: T4 320 GB/s, A100 SXM 80 GB 2039 GB/s, H100 SXM 3350 GB/s)
GPUS = {
    75: dict(gpu="T4", bandwidth_gbs=320, regs=65536, max_warps=32, max_blocks=16, smem=64 * 1024, reserved=0),
    80: dict(gpu="A100 SXM 80 GB", bandwidth_gbs=2039, regs=65536, max_warps=64, max_blocks=32, smem=164 * 1024,
             reserved=1024),
    90: dict(gpu="H100 SXM", bandwidth_gbs=3350, regs=65536, max_warps=64, max_blocks=32, smem=228 * 1024,
             reserved=1024),
}
DTYPES = (torch.float32, torch.bfloat16)  # the flat buckets' dtypes: w, g, m, v share one (agip/flat.py)
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.bool: "i1",
                torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
SCORES = (-1, *sorted(set(FISHER_POWERS.values())))  # Taylor, then Fisher |w| v^(q/4) (algorithm.md §2.1b)


def kernel_modules():
    """The modules of ``agip.kernels`` (the checkout's ``kernels/`` folder), imported."""
    from agip.backends import triton as backend  # registers agip.kernels (_own_kernels)

    del backend
    pkg = importlib.import_module("agip.kernels")
    return [importlib.import_module(f"agip.kernels.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def kernels_of(module):
    """The launchable kernels defined in ``module``: JIT functions with a pointer argument."""
    import triton

    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.jit.JITFunction) and obj.fn.__module__ == module.__name__
            and any(a.endswith("_ptr") for a in obj.arg_names)}


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kw)`` records the launch instead."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append(variant(self.fn, args, kw))
        return launch


def type_of(x) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + TRITON_TYPES[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2**31 <= x < 2**31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(x).__name__} argument")


def variant(fn, args, kw) -> dict:
    """One launch as (kernel, signature, constexprs, compile options), JSON-able."""
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kw.items() if k in names})
    const = {p.name for p in fn.params if p.is_constexpr}
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{fn.__name__}: a launch left out {missing}")
    return dict(module=fn.fn.__module__, kernel=fn.__name__,
                signature={n: ("constexpr" if n in const else type_of(bound[n])) for n in names},
                constexprs={n: bound[n] for n in names if n in const},
                options={k: v for k, v in kw.items() if k not in names})


def launcher_inputs(dtype):
    """Every input the fused driver can hand each launcher (agip/backends/fused.py), by launcher."""
    from agip.backends import UpdateArgs

    n = 8  # one program: shapes do not reach the compiled code
    t = dict(dtype=dtype)
    g, w, v, m = (torch.zeros(n, **t) for _ in range(4))
    mask, ema = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float32)
    hist = torch.zeros(1 << 16, dtype=torch.int32)
    for saliency, regrow, q, with_ema in itertools.product((False, True), (False, True), SCORES, (False, True)):
        yield "stats", (g, w, v, mask, ema if with_ema else None, n, saliency, regrow, q, 1.0, 0.999, 0.001,
                        0.0, 1.0, 0, 65535, hist, hist), {}
    for saliency, q, with_ema in itertools.product((False, True), SCORES, (False, True)):
        yield "refine", (g, w, v, mask, ema if with_ema else None, n, 0, saliency, q, 1.0, 0.999, 0.001, 0.0, 1.0,
                         hist), {}
    for prunable, prune_step, q, with_ema, ahead in itertools.product((False, True), (False, True), SCORES,
                                                                      (False, True), (False, True)):
        args = UpdateArgs(decay=1.0, lerp_weight=0.1, beta2=0.999, one_minus_beta2=0.001, step_size=-1e-4,
                          bc2_sqrt=0.1, eps=1e-8, clip=1.0, neg_lr_s=0.0, theta=0.0, regrow_theta=math.inf,
                          ema_keep=0.0, ema_new=1.0, score_beta2=0.999, score_omb2=0.001, prunable=prunable,
                          prune_step=prune_step, fisher_q=q)
        yield "update", (w, g, m, v, mask, ema if with_ema else None, 0, n, args), \
            dict(ahead=(hist, 0, 65535, None, None, None) if ahead else None)


def enumerate_variants(dtypes=DTYPES):
    """Every distinct launch of every kernel, and the kernels that none reached (an error)."""
    modules = kernel_modules()
    saved = [(m, k, fn) for m in modules for k, fn in kernels_of(m).items()]
    launchers = {name: obj for m in modules for name, obj in vars(m).items()
                 if inspect.isfunction(obj) and obj.__module__ == m.__name__}
    launches = []
    try:
        for m, k, fn in saved:
            setattr(m, k, Recorder(fn, launches))
        for dtype in dtypes:
            for launcher, args, kwargs in launcher_inputs(dtype):
                if launcher not in launchers:
                    raise LookupError(f"no launcher {launcher!r} in kernels/: update launcher_inputs()")
                try:
                    launchers[launcher](*args, **kwargs)
                except ValueError:
                    continue  # the launcher refuses it, so the driver cannot launch it
    finally:
        for m, k, fn in saved:
            setattr(m, k, fn)
    unique = {json.dumps(v, sort_keys=True): v for v in launches}
    reached = {(v["module"], v["kernel"]) for v in unique.values()}
    return list(unique.values()), sorted(f"{m.__name__}.{k}" for m, k, _ in saved if (m.__name__, k) not in reached)


def cover(variants):
    """A subset where every kernel meets each of its constexpr values and each argument type
    of each of its arguments at least once (greedy): what the default test compiles."""
    chosen = []
    for kernel in sorted({v["kernel"] for v in variants}):
        mine = [v for v in variants if v["kernel"] == kernel]

        def features(v):
            return {("c", k, json.dumps(x)) for k, x in v["constexprs"].items()} | \
                   {("t", k, x) for k, x in v["signature"].items()}
        need = set().union(*(features(v) for v in mine))
        while need:
            best = max(mine, key=lambda v: len(features(v) & need))
            chosen.append(best)
            need -= features(best)
    return chosen


def domains(variants) -> dict:
    """Per kernel, the values each constexpr takes over the variants (JSON-able)."""
    out = {}
    for v in variants:
        for k, x in v["constexprs"].items():
            out.setdefault(v["kernel"], {}).setdefault(k, set()).add(x)
    return {kernel: {k: sorted(xs) for k, xs in cs.items()} for kernel, cs in out.items()}


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job):
    """Compile one variant for one target; its resource usage by cuobjdump, or the error."""
    v, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(v["module"]), v["kernel"])
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, v["signature"], v["constexprs"]),
                                  target=GPUTarget("cuda", cc, 32), options=v["options"])
    except Exception as e:  # noqa: BLE001  a compile error is a result: reported, and the check fails
        return dict(error=f"{type(e).__name__}: {str(e)[-800:]}")
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return dict(regs=int(usage["REG"]), stack=int(usage["STACK"]), local=int(usage["LOCAL"]),
                shared=int(usage["SHARED"]), num_warps=compiled.metadata.num_warps, compile_s=round(seconds, 2))


def occupancy(regs: int, shared: int, num_warps: int, cc: int) -> float:
    """Active warps per SM over the SM's maximum, from registers (allocated per warp in units
    of 256), shared memory and the block limits: the CUDA occupancy calculator's arithmetic."""
    gpu = GPUS[cc]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (gpu["regs"] // regs_per_warp) // num_warps
    by_smem = gpu["smem"] // (shared + gpu["reserved"]) if shared + gpu["reserved"] else gpu["max_blocks"]
    blocks = min(by_regs, by_smem, gpu["max_blocks"], gpu["max_warps"] // num_warps)
    return blocks * num_warps / gpu["max_warps"]


def problems(rows) -> list:
    """What fails the check: compile errors, register spills (local memory or stack)."""
    out = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['cc']} {r['constexprs']} {r['dtype']}"
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
        elif r["local"] or r["stack"]:
            out.append(f"{where}: spills ({r['local']} B local memory, {r['stack']} B stack; {r['regs']} registers)")
    return out


def step_times():
    """The byte model's step time (docs/design.md) of SmolLM2-135M's shapes at each GPU's
    bandwidth, for bench_step's kinds (fp32 buffers, 1-byte mask): the floor a kernel that
    moves only those bytes reaches."""
    sys.path.insert(0, HERE)
    import bench_step

    prunable, other = bench_step.shapes_for(134.5)
    n_p = sum(a * b for a, b in prunable)
    n = n_p + sum(math.prod(s) for s in other)
    kinds = ("step", "prune-fisher-prev", "prune-fisher", "prune-taylor")
    return [dict(kind=k, bytes=bench_step.BYTES[k][0] * n + bench_step.BYTES[k][1] * n_p,
                 **{f"sm_{cc}_ms": 1e3 * (bench_step.BYTES[k][0] * n + bench_step.BYTES[k][1] * n_p)
                    / (GPUS[cc]["bandwidth_gbs"] * 1e9) for cc in GPUS}) for k in kinds], n, n_p


def dtype_of(v) -> str:
    return v["signature"][next(k for k in v["signature"] if k.startswith("w"))].lstrip("*")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, nargs="+", default=sorted(GPUS), choices=sorted(GPUS))
    ap.add_argument("--cover", action="store_true", help="a covering subset of the variants (the default test's)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "gpu_targets.json"))
    ap.add_argument("--md", default=os.path.join(HERE, "results", "gpu_targets.md"))
    args = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("gpu_targets: needs triton (pip install triton)", file=sys.stderr)
        return 2
    variants, unreached = enumerate_variants()
    if unreached:
        print(f"gpu_targets: no launcher reaches {unreached}: teach launcher_inputs() their inputs", file=sys.stderr)
        return 1
    picked = cover(variants) if args.cover else variants
    jobs = [(v, cc) for cc in args.targets for v in picked]
    print(f"{len(variants)} variants ({len(picked)} compiled) x {len(args.targets)} targets: {len(jobs)} compiles, "
          f"{args.jobs} processes", flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_one, jobs))
    rows = []
    for (v, cc), res in zip(jobs, results):
        row = dict(kernel=v["kernel"], module=v["module"], cc=cc, dtype=dtype_of(v), constexprs=v["constexprs"],
                   signature=v["signature"], **res)
        if "error" not in res:
            row["occupancy"] = occupancy(res["regs"], res["shared"], res["num_warps"], cc)
        rows.append(row)
    times, n, n_p = step_times()
    bad = problems(rows)
    out = dict(triton=triton.__version__, torch=torch.__version__, started=time.strftime("%F %T"),
               seconds=round(time.time() - t0, 1), variants=len(variants), compiled=len(picked), cover=args.cover,
               domains=domains(variants),
               gpus={f"sm_{cc}": GPUS[cc] for cc in args.targets}, params=n, prunable=n_p, step_times=times,
               rows=rows, problems=bad)
    for path in (args.json, args.md):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    md = report(out)
    with open(args.md, "w") as f:
        f.write(md)
    print(md)
    for p in bad:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if bad else 0


def report(out) -> str:
    """The Markdown table: per kernel and target, the range over its variants."""
    lines = [f"# Triton kernels compiled for GPU targets (triton {out['triton']}, no GPU)", "",
             f"{out['variants']} variants the driver can launch ({out['compiled']} compiled"
             f"{', a covering subset' if out['cover'] else ''}), each for "
             f"{', '.join(out['gpus'])}; {out['seconds']} s. Problems: {len(out['problems'])}.", "",
             "| kernel | target | variants | registers | spills (local B) | shared B | warps | occupancy |",
             "|---|---|---|---|---|---|---|---|"]
    key = sorted({(r["kernel"], r["cc"]) for r in out["rows"]})
    for kernel, cc in key:
        rs = [r for r in out["rows"] if r["kernel"] == kernel and r["cc"] == cc and "error" not in r]
        errs = sum(1 for r in out["rows"] if r["kernel"] == kernel and r["cc"] == cc and "error" in r)

        def span(k, fmt="{}"):
            lo, hi = min(r[k] for r in rs), max(r[k] for r in rs)
            return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"
        if not rs:
            lines.append(f"| {kernel} | sm_{cc} | {errs} errors | | | | | |")
            continue
        lines.append(f"| {kernel} | sm_{cc} ({GPUS[cc]['gpu']}) | {len(rs)}{f' + {errs} errors' if errs else ''} | "
                     f"{span('regs')} | {span('local')} | {span('shared')} | {span('num_warps')} | "
                     f"{span('occupancy', '{:.0%}')} |")
    lines += ["", f"The byte model's step time (docs/design.md; {out['params'] / 1e6:.1f}M parameters, "
              f"{out['prunable'] / 1e6:.1f}M prunable, fp32) at each GPU's memory bandwidth:", "",
              "| step | MB moved | " + " | ".join(f"{g} ({out['gpus'][g]['gpu']}, {out['gpus'][g]['bandwidth_gbs']} GB/s) ms"
                                           for g in out["gpus"]) + " |",
              "|---|---|" + "---|" * len(out["gpus"])]
    for t in out["step_times"]:
        lines.append(f"| {t['kind']} | {t['bytes'] / 1e6:.0f} | " +
                     " | ".join(f"{t[g + '_ms']:.3f}" for g in out["gpus"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
