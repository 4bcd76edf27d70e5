"""End-to-end training speed: tokens/s of a real model trained with torch's fused AdamW
+ clip, with ``agip.TAAdamW(ta_gamma=0)``, and with AGIP pruning every step.

The three run in one process on three copies of the same model, interleaved round by
round on the same batches (bf16 autocast, as ``agip finetune``), so every one sees the
same machine state. Forward + backward and the optimizer step (with ``zero_grad``) are
timed apart; the first round is a warm-up and is not counted. Prints a table of medians
and writes JSON.

    python benchmarks/bench_train.py                          # embedded SmolLM2-135M, CPU
    python benchmarks/bench_train.py --rounds 6 --steps 3 --out results.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _checkout  # noqa: E402,F401  (this checkout's agip, its root off sys.path)

import agip  # noqa: E402
import agip.distill  # noqa: E402
from agip import precision  # noqa: E402
from agip.data import join, load_corpus  # noqa: E402
from agip.models import EMBEDDED, load_model  # noqa: E402
from agip.train import peak_memory, tokenize  # noqa: E402


def plain_loss(m, x):
    return m(x, labels=x).loss


def make_configs(model, backend: str, total_steps: int, distill: bool = False) -> dict:
    """name -> a function that builds (model copy, step function, loss function): built one
    at a time, so that ``--memory`` measures each configuration alone."""
    def adamw():
        m = copy.deepcopy(model)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(agip.param_groups(m), lr=5e-5, weight_decay=0.01, fused=True)

        def adamw_step(opt=opt, params=params, loss=None):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return m, adamw_step, plain_loss

    def taadamw():
        m = copy.deepcopy(model)
        opt = agip.TAAdamW(agip.param_groups(m), lr=5e-5, ta_gamma=0.0, backend=backend)

        def ta_step(opt=opt, loss=None):
            opt.step(loss=loss)
            opt.zero_grad()

        return m, ta_step, plain_loss

    # every timed step is a pruning step of a ramp: theta > 0 and new entries pruned each step;
    # the default's score (v_t), and the score of v_(t-1), which the previous update histograms
    def pruning(moment, loss_fn=None):
        def build():
            m = copy.deepcopy(model)
            opt = agip.AGIP(agip.param_groups(m), lr=5e-5, target_sparsity=0.5, total_steps=total_steps,
                            warmup_steps=0, prune_interval=1, fisher_moment=moment, backend=backend)

            def agip_step(opt=opt, loss=None):
                opt.step(loss=loss)
                opt.zero_grad()

            return m, agip_step, loss_fn() if loss_fn else plain_loss
        return build

    def distilled(**weights):  # the teacher: a frozen bf16 copy of the model before pruning
        return lambda: agip.distill.DistillLoss(agip.distill.load_teacher("start", model), **weights)

    configs = {"torch AdamW(fused) + clip": adamw, f"agip.TAAdamW(ta_gamma=0), {backend}": taadamw,
               f"AGIP pruning every step (fisher), {backend}": pruning("current"),
               f"AGIP pruning every step (fisher of v_(t-1)), {backend}": pruning("previous")}
    if distill:  # distillation's cost: the teacher's forward pass and the KL over the vocabulary
        configs[f"AGIP (fisher) + distillation, KL, {backend}"] = pruning("current", distilled(kl=1.0))
        # the same terms with the model's own CE beside the KL (two full-vocabulary passes, as
        # every distilled study row before the one-pass CE + KL): what the shared pass saves
        configs[f"AGIP (fisher) + distillation, KL, own CE, {backend}"] = pruning(
            "current", distilled(kl=1.0, fuse_ce=False))
        configs[f"AGIP (fisher) + distillation, KL + SquareHead, {backend}"] = pruning(
            "current", distilled(kl=1.0, hidden=1.0))
    return configs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--dataset", default="wiki-mini")
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--rounds", type=int, default=4, help="rounds after one warm-up round")
    ap.add_argument("--steps", type=int, default=2, help="steps per configuration per round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--bf16-matmul", default="auto", choices=precision.MODES,
                    help="bf16 autocast's products, as agip finetune's flag: 'auto' emulates them on a CPU without "
                         "bf16 units")
    ap.add_argument("--distill", action="store_true",
                    help="add AGIP with distillation (teacher: a bf16 copy of the start model; KL, KL + SquareHead)")
    ap.add_argument("--memory", action="store_true",
                    help="also run each configuration alone in a child process (2 steps) and report its peak memory "
                         "(RSS on the CPU, the allocator's peak on CUDA)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # the child of --memory: one configuration
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_train-cpu.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        sys.exit("--rounds and --steps must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model)
    model.to(device).train()
    ids = tokenize(tok, join(load_corpus(args.dataset)["train"]))
    n_blocks = ids.numel() // args.block_size
    blocks = ids[: n_blocks * args.block_size].view(n_blocks, args.block_size)
    total = (args.rounds + 1) * args.steps
    builders = make_configs(model, args.backend, total_steps=total + 1, distill=args.distill)
    if args.only is not None:  # one configuration alone: its peak memory
        m, opt_step, loss_fn = builders[args.only]()
        del model
        for i in range(args.steps):
            x = blocks[[(i * args.batch_size + j) % n_blocks for j in range(args.batch_size)]].to(device)
            with precision.autocast(device, not args.fp32, args.bf16_matmul):
                loss = loss_fn(m, x)
            loss.backward()
            opt_step(loss=loss.item())
        print(json.dumps({"peak_memory_bytes": peak_memory()}))
        return None
    # each configuration's memory first, while this process holds one model and not all of them
    # (a child beside this process at its peak would need twice the memory)
    memory = {name: child_peak_memory(argv_for(args, name)) for name in builders} if args.memory else {}
    configs = {name: build() for name, build in builders.items()}
    del model
    tokens = args.batch_size * args.block_size
    times = {name: {"fwd_bwd": [], "opt": [], "total": []} for name in configs}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step = 0
    for rnd in range(args.rounds + 1):
        for i in range(args.steps):
            x = blocks[[(step * args.batch_size + j) % n_blocks for j in range(args.batch_size)]].to(device)
            step += 1
            for name, (m, opt_step, loss_fn) in configs.items():
                sync()
                t0 = time.perf_counter()
                with precision.autocast(device, not args.fp32, args.bf16_matmul):
                    loss = loss_fn(m, x)
                loss.backward()
                E = loss.item()
                sync()
                t1 = time.perf_counter()
                opt_step(loss=E)
                sync()
                t2 = time.perf_counter()
                if rnd > 0:  # round 0 warms up allocators, thread pools and the C++ build
                    times[name]["fwd_bwd"].append(t1 - t0)
                    times[name]["opt"].append(t2 - t1)
                    times[name]["total"].append(t2 - t0)
        print(f"round {rnd + 1}/{args.rounds + 1} done", file=sys.stderr, flush=True)

    rows = []
    base = statistics.median(next(iter(times.values()))["total"])
    for name, t in times.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append(dict(config=name, fwd_bwd_s=med["fwd_bwd"], opt_step_s=med["opt"], step_s=med["total"],
                         tokens_per_s=tokens / med["total"], tokens_per_s_vs_adamw=base / med["total"],
                         samples=len(t["total"]), peak_memory_bytes=memory.get(name)))
    products = None if args.fp32 else precision.resolve(args.bf16_matmul, device)
    print(f"{args.model} on {device}, {torch.get_num_threads()} threads, {tokens} tokens/step, "
          f"{'fp32' if args.fp32 else f'bf16 autocast ({products} products)'}, medians of {rows[0]['samples']} steps")
    header = (f"{'configuration':<58} {'fwd+bwd s':>10} {'opt step s':>11} {'step s':>8} {'tokens/s':>9} {'vs AdamW':>9}"
              + (f" {'peak mem GB':>12}" if memory else ""))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<58} {r['fwd_bwd_s']:>10.3f} {r['opt_step_s']:>11.3f} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s_vs_adamw']:>9.3f}"
              + (f" {r['peak_memory_bytes'] / 1e9:>12.2f}" if memory else ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "tokens_per_step": tokens, "bf16": not args.fp32, "bf16_products": products,
                   "rows": rows, "times": times,
                   # this process held every configuration at once: each child's peak must be below it
                   "peak_memory_bytes_all": peak_memory() if memory else None}, f, indent=2)
    print(f"wrote {args.out}")
    return rows


def argv_for(args, name: str) -> list:
    out = ["--model", args.model, "--dataset", args.dataset, "--backend", args.backend, "--steps", "2",
           "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--only", name]
    return out + (["--fp32"] if args.fp32 else []) + (["--distill"] if args.distill else []) + \
        ["--bf16-matmul", args.bf16_matmul]


def child_peak_memory(argv: list) -> int:
    """The peak memory (``agip.train.peak_memory``: its own, not the parent's) of a child process that runs one configuration alone: the
    model, the corpus, the copy under test and its optimizer (and teacher) state."""
    import subprocess

    res = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the memory run of {argv[-1]!r} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_memory_bytes"]


if __name__ == "__main__":
    main()
