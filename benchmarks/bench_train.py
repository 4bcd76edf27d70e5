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
from agip.data import join, load_corpus  # noqa: E402
from agip.models import EMBEDDED, load_model  # noqa: E402
from agip.train import tokenize  # noqa: E402


def make_configs(model, backend: str, total_steps: int):
    """name -> (model copy, optimizer, step function)."""
    configs = {}

    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(agip.param_groups(m), lr=5e-5, weight_decay=0.01, fused=True)

    def adamw_step(opt=opt, params=params, loss=None):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    configs["torch AdamW(fused) + clip"] = (m, adamw_step)

    m = copy.deepcopy(model)
    opt = agip.TAAdamW(agip.param_groups(m), lr=5e-5, ta_gamma=0.0, backend=backend)

    def ta_step(opt=opt, loss=None):
        opt.step(loss=loss)
        opt.zero_grad()

    configs[f"agip.TAAdamW(ta_gamma=0), {backend}"] = (m, ta_step)

    # every timed step is a pruning step of a ramp: theta > 0 and new entries pruned each step;
    # the default's score (v_t), and the score of v_(t-1), which the previous update histograms
    for moment, label in (("current", ""), ("previous", " of v_(t-1)")):
        m = copy.deepcopy(model)
        opt = agip.AGIP(agip.param_groups(m), lr=5e-5, target_sparsity=0.5, total_steps=total_steps, warmup_steps=0,
                        prune_interval=1, fisher_moment=moment, backend=backend)

        def agip_step(opt=opt, loss=None):
            opt.step(loss=loss)
            opt.zero_grad()

        configs[f"AGIP pruning every step ({opt.config.saliency}{label}), {backend}"] = (m, agip_step)
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
    configs = make_configs(model, args.backend, total_steps=total + 1)
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
            for name, (m, opt_step) in configs.items():
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32):
                    loss = m(x, labels=x).loss
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
                         samples=len(t["total"])))
    print(f"{args.model} on {device}, {torch.get_num_threads()} threads, {tokens} tokens/step, "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}, medians of {rows[0]['samples']} steps")
    header = f"{'configuration':<52} {'fwd+bwd s':>10} {'opt step s':>11} {'step s':>8} {'tokens/s':>9} {'vs AdamW':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<52} {r['fwd_bwd_s']:>10.3f} {r['opt_step_s']:>11.3f} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s_vs_adamw']:>9.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "tokens_per_step": tokens, "bf16": not args.fp32,
                   "rows": rows, "times": times}, f, indent=2)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
