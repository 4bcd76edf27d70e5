"""Step micro-benchmark: one AGIP step against torch's fused AdamW + clip_grad_norm_.

For each size and each backend that runs on the device, times a non-pruning step and, for
each score (Taylor |w·g|, Fisher |w|·√v), a pruning step of a sparsity *ramp* (every timed
step prunes new entries: theta > 0, the exact threshold every step), and a Fisher first
pruning step (no previous theta: the full histogram), interleaved with the baseline in one
run; reports medians, effective GB/s by the byte model of docs/design.md (32 B per
parameter plus, per prunable parameter, 2 B non-pruning, 7 B Taylor pruning, 16 B Fisher
pruning when theta lands in the band of keys pass A kept, 2 B for the Fisher score of
v_(t-1) whose histogram the previous update made ("scores ahead"), 29 B on a first pruning
step, which runs pass B; fp32) and the ratio to ``torch.optim.AdamW(fused=True)`` +
``clip_grad_norm_``. Buffers are shaped like
SmolLM2-135M (per layer q, o 576x576; k, v 576x192; gate, up 576x1536; down 1536x576;
a tied 49152x576 embedding; norms), with the layer count and embedding scaled to size.

    python benchmarks/bench_step.py                       # CPU: 1M and 10M parameters
    python benchmarks/bench_step.py --sizes 10 50 135     # sizes in millions (GPU default)
    python benchmarks/bench_step.py --backends reference --reps 5 --out results.json
    python benchmarks/bench_step.py --sizes 134.5 --backends cpp --kinds step prune-fisher-prev  # less memory
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import _checkout  # noqa: F401  (this checkout's agip, its root off sys.path)
import agip
from agip import backends

# bytes moved per step by the byte model of docs/design.md (fp32, 1-byte mask), as
# (per parameter, extra per prunable parameter)
# "-exp": the same step at the start of an exponential ramp (T = 100, tau = 15: the study's),
# where theta moves by less each step but not as its last move predicts, so the kept band can
# miss (then pass B reads 9-13 B more; the rows count band hits and window misses)
BYTES = {"step": (32, 2), "prune-taylor": (32, 7), "prune-fisher": (32, 16), "prune-fisher-exp": (32, 16),
         "prune-fisher-prev": (32, 2), "prune-fisher-prev-exp": (32, 2), "prune-fisher-prev-pass-a": (32, 11),
         "prune-first": (32, 29),
         # 2:4: the fused update as on a non-pruning step; the N:M selection's own PyTorch pass
         # (a sort per group of 4) is not in the model, so their GB/s are a floor
         "prune-24": (32, 2), "prune-24-decay": (32, 2)}
# kind -> (prune_interval, saliency, fisher_moment, schedule, scores ahead)
KINDS = {
    "step": (10**9, "fisher", "current", "cubic", True),
    "prune-taylor": (1, "taylor", "current", "cubic", True),
    "prune-fisher": (1, "fisher", "current", "cubic", True),
    "prune-fisher-exp": (1, "fisher", "current", "exp", True),
    # the Fisher score of v_(t-1): the previous update histogrammed this step's scores (pass A
    # reads g and the mask only, as a non-pruning step); "-pass-a": the same score from pass A
    "prune-fisher-prev": (1, "fisher", "previous", "cubic", True),
    "prune-fisher-prev-exp": (1, "fisher", "previous", "exp", True),
    "prune-fisher-prev-pass-a": (1, "fisher", "previous", "cubic", False),
    "prune-first": (1, "fisher", "current", "cubic", True),
    # 2:4 (the default score, v_(t-1)): fixed groups, and the decay mode (masks may change) of the
    # chosen 2:4 mode (decay 0.2)
    "prune-24": (1, "fisher", "previous", "cubic", True),
    "prune-24-decay": (1, "fisher", "previous", "cubic", True),
}
PATTERNS = {"prune-24": dict(sparsity_pattern="2:4"), "prune-24-decay": dict(sparsity_pattern="2:4", nm_mode="decay",
                                                                              nm_decay=0.2)}
# the cubic rows' ramp length (the ramp of the first published figures, --reps 9) and the
# warm-up calls before timing: a run makes warm-up + reps + 1 calls, all before the ramp's end
CUBIC_STEPS, WARMUP = 24, 2
HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]
PER_LAYER = sum(a * b for a, b in LAYER_SHAPES)


def shapes_for(millions: float):
    """(prunable shapes, other shapes) with ~``millions`` M parameters, SmolLM2's proportions."""
    total = int(millions * 1e6)
    full = LAYERS * PER_LAYER + VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN
    layers = max(1, round(LAYERS * total / full))
    prunable = [s for _ in range(layers) for s in LAYER_SHAPES]
    if layers * PER_LAYER > total:  # small sizes: shrink the layer widths instead
        f = (total * 0.79 / (layers * PER_LAYER)) ** 0.5
        # (multiples of 4, so the 2:4 rows' groups fit)
        prunable = [(max(4, int(a * f) // 4 * 4), max(4, int(b * f) // 4 * 4)) for a, b in prunable]
    rest = max(HIDDEN, total - sum(a * b for a, b in prunable))
    vocab = max(1, (rest - (2 * layers + 1) * HIDDEN) // HIDDEN)
    other = [(vocab, HIDDEN)] + [(HIDDEN,)] * (2 * layers + 1)
    return prunable, other


def make_params(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
        params.append(p)
    return params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, reps: int, device) -> dict:
    """Median seconds of each function, timed in turn ``reps`` times (interleaved, so
    every one sees the same machine state)."""
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=float, nargs="+", help="parameter counts in millions")
    ap.add_argument("--backends", nargs="+", help="default: every backend that runs on the device")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--cubic-steps", type=int, default=CUBIC_STEPS,
                    help="length of the cubic ramp of the non-exp pruning rows (default 24: the ramp of the "
                         "first published figures, --reps 9); shorter is steeper (theta moves further a step)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_step-<device>.json)")
    ap.add_argument("--obs", action="store_true",
                    help="also time compensate='obs' (the OBS sweep and the input hooks of one SmolLM2 layer, CPU)")
    ap.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS),
                    help="which AGIP steps to time (each holds a model-sized state: fewer kinds, less memory)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device; use --device cpu")
    sizes = args.sizes or ([10, 50, 135] if device.type == "cuda" else [1, 10])
    if args.reps < 1 or args.warmup < 0:
        sys.exit("--reps must be >= 1 and --warmup >= 0")
    if args.warmup + args.reps + 1 >= args.cubic_steps:
        # the ramp must still climb at the last call, or the last pruning steps prune nothing new
        sys.exit(f"--cubic-steps {args.cubic_steps} ends before the last of the {args.warmup + args.reps + 1} calls: "
                 f"pass --cubic-steps > warmup + reps + 1 or fewer --reps")
    names = args.backends or [b for b in backends.available() if runs_on(b, device)]  # (builds the C++ backend)

    rows = []
    for size in sizes:
        prunable_shapes, other_shapes = shapes_for(size)
        configs = {}
        # baseline: torch's fused AdamW + clip_grad_norm_
        base_params = make_params(prunable_shapes + other_shapes, device, 0)
        base_opt = torch.optim.AdamW(base_params, lr=5e-5, weight_decay=0.01, fused=True)

        def base_step(params=base_params, opt=base_opt):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        configs[("torch-fused-adamw+clip", "step")] = base_step
        n_params = sum(p.numel() for p in base_params)
        n_prunable = sum(p.numel() for p in base_params[: len(prunable_shapes)])
        opts = {}
        for name in names:
            for kind in args.kinds:
                interval, saliency, moment, shape, ahead = KINDS[kind]
                params = make_params(prunable_shapes + other_shapes, device, 0)
                groups = [{"params": params[: len(prunable_shapes)], "prune": True},
                          {"params": params[len(prunable_shapes):], "weight_decay": 0.0}]
                # a cubic ramp to 50% that is still climbing at the last timed call (every
                # pruning step prunes new entries above the previous theta), or the start of
                # the study's exponential ramp (T = 100: tau = 15 steps). The ramp's length is
                # fixed, not tied to --reps: before, 2 x calls made it steeper with fewer reps
                opt = agip.AGIP(groups, target_sparsity=0.5, schedule=shape,
                                total_steps=args.cubic_steps if shape == "cubic" else 100, warmup_steps=0,
                                prune_interval=interval, saliency=saliency, fisher_moment=moment, ta_gamma=0.0,
                                stability=False, backend=name, **PATTERNS.get(kind, {}))
                opt._score_ahead = opt._score_ahead and ahead
                opts[(name, kind)] = opt
                if kind == "prune-first":  # as a first pruning step: no previous theta, full histogram

                    def first(o=opt, name=name):
                        if name in o._flat.scratch:
                            o._flat.scratch[name].forget_theta()
                        o.step(loss=2.5)

                    configs[(name, kind)] = first
                else:
                    configs[(name, kind)] = (lambda o=opt: o.step(loss=2.5))
        for _ in range(args.warmup):
            for fn in configs.values():
                fn()
        medians = time_interleaved(configs, args.reps, device)
        base = medians[("torch-fused-adamw+clip", "step")]
        for (name, kind), med in medians.items():
            row = dict(size_m=round(n_params / 1e6, 2), prunable_m=round(n_prunable / 1e6, 2), backend=name,
                       step=kind, median_ms=med * 1e3, ratio_to_fused_adamw=med / base)
            if name != "torch-fused-adamw+clip":
                per_param, per_prunable = BYTES[kind]
                row["gbps_by_model"] = (per_param * n_params + per_prunable * n_prunable) / med / 1e9
                st = opts[(name, kind)]._flat.scratch.get(name)
                if st is not None:  # how the thresholds were found, over every call (warm-up included)
                    row.update(calls=args.warmup + args.reps, band_hits=st.band_hits, window_misses=st.window_misses,
                               ahead_hits=st.ahead_hits)
            rows.append(row)
        del configs, opts, base_params, base_opt

    print(f"device: {device_name(device)}   torch {torch.__version__}   reps {args.reps} (medians)")
    header = (f"{'params':>8} {'backend':<24} {'step':<25} {'median ms':>10} {'GB/s (model)':>13} "
              f"{'x fused AdamW':>14} {'band / miss / ahead':>20}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gb = f"{r['gbps_by_model']:.1f}" if "gbps_by_model" in r else "-"
        hits = f"{r['band_hits']} / {r['window_misses']} / {r['ahead_hits']}" if "band_hits" in r else "-"
        print(f"{r['size_m']:>7}M {r['backend']:<24} {r['step']:<25} {r['median_ms']:>10.2f} {gb:>13} "
              f"{r['ratio_to_fused_adamw']:>14.2f} {hits:>20}")
    compensation = obs_times() if args.obs else None
    if compensation:
        c = compensation
        print(f"compensate='obs', one SmolLM2 layer (CPU): sweep of its 7 weights, every row 2:4-cut, "
              f"{c['layer_sweep_ms']:.0f} ms ({c['model_sweep_s']:.1f} s for {c['layers']} layers, a pruning step's "
              f"most); input hooks {c['hook_ms_per_batch_layer']:.1f} ms a batch of {c['tokens_per_batch']} tokens "
              f"({c['hook_s_per_batch_model']:.2f} s for the model); H {c['h_bytes_layer'] / 1e6:.1f} MB a layer, "
              f"{c['h_bytes_model'] / 1e6:.0f} MB in all")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"bench_step-{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": device_name(device), "torch": torch.__version__, "reps": args.reps, "warmup": args.warmup,
                   "cubic_steps": args.cubic_steps,
                   "bytes_per_param": BYTES, "rows": rows, "obs": compensation}, f, indent=2)
    print(f"wrote {out}")
    return rows


def obs_times(reps: int = 3, tokens: int = 1024) -> dict:
    """``compensate="obs"`` (docs/algorithm.md §2.6) on one SmolLM2-135M layer, CPU, medians:
    the OBS sweep of each of its 7 weights with a 2:4 cut of every row (the most one pruning
    step can ask), from H of random inputs; and the forward hooks' cost per training batch of
    ``tokens`` tokens (H += xᵀx for each of the layer's 4 distinct inputs: q/k/v share one, as
    do gate/up). A model's figures are a layer's times LAYERS; H's memory is exact."""
    from agip import obs

    g = torch.Generator().manual_seed(0)
    sweeps, hooks = [], []
    for out_f, in_f in LAYER_SHAPES:
        x = torch.randn(tokens, in_f, generator=g)
        h = x.t() @ x
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        small = w.abs().view(out_f, -1, 4).topk(2, dim=-1, largest=False).indices
        prune = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool).scatter_(-1, small, True).view(out_f, in_f)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            obs.sweep(w, h, prune=prune)
            times.append(time.perf_counter() - t0)
        sweeps.append(dict(shape=[out_f, in_f], median_ms=1e3 * statistics.median(times)))
    for in_f in (HIDDEN, HIDDEN, HIDDEN, INTER):  # attention input, o_proj's, the MLP's, down_proj's
        x, h = torch.randn(tokens, in_f, generator=g), torch.zeros(in_f, in_f)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            h.addmm_(x.t(), x)
            times.append(time.perf_counter() - t0)
        hooks.append(1e3 * statistics.median(times))
    layer_ms = sum(s["median_ms"] for s in sweeps)
    h_bytes = 4 * (3 * HIDDEN**2 + INTER**2)
    return dict(sweeps=sweeps, layer_sweep_ms=layer_ms, model_sweep_s=layer_ms * LAYERS / 1e3,
                hook_ms_per_batch_layer=sum(hooks), hook_s_per_batch_model=sum(hooks) * LAYERS / 1e3,
                tokens_per_batch=tokens, h_bytes_layer=h_bytes, h_bytes_model=h_bytes * LAYERS, layers=LAYERS)


def runs_on(name, device):
    try:
        backends.resolve(name, device)
        return True
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    main()
