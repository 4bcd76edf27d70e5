"""One forward + backward of the embedded model in fp32, under bf16 autocast with emulated
products, and under bf16 autocast with native bf16 products (agip/precision.py).

On a CPU without bf16 units the native products fall back to a scalar loop: this measures
what the emulation buys there, and how far its loss and gradients are from the native ones
on the same batch. Modes alternate round by round; medians. Prints a table, writes JSON.

    python benchmarks/bench_precision.py                         # 4x256 tokens, 3 rounds
    python benchmarks/bench_precision.py --modes fp32 emulated   # skip the slow native products
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _checkout  # noqa: E402,F401  (this checkout's agip, its root off sys.path)

from agip import precision  # noqa: E402
from agip.data import join, load_corpus  # noqa: E402
from agip.models import EMBEDDED, load_model  # noqa: E402
from agip.train import tokenize  # noqa: E402

MODES = ("fp32", "emulated", "native")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--dataset", default="wiki-mini")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=3, help="rounds after one warm-up round")
    ap.add_argument("--native-rounds", type=int, default=1, help="rounds of native products (minutes each without bf16 units)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_precision-cpu.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.native_rounds < 1 or args.batch_size < 1 or args.block_size < 2:
        sys.exit("--rounds and --native-rounds must be >= 1, --batch-size >= 1, --block-size >= 2")
    model, tok = load_model(args.model)
    model.eval()  # no dropout: the modes must see the same function (gradients are still taken)
    ids = tokenize(tok, join(load_corpus(args.dataset)["train"]))
    x = ids[: args.batch_size * args.block_size].view(args.batch_size, args.block_size)

    def step(mode):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with precision.autocast("cpu", mode != "fp32", "native" if mode == "fp32" else mode):
            loss = model(x, labels=x).loss
        loss.backward()
        return time.perf_counter() - t0, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    times = {m: [] for m in args.modes}
    loss, grads = {}, {}
    for rnd in range(args.rounds + 1):
        for m in args.modes:
            if m == "native" and rnd > args.native_rounds:
                continue
            t, loss[m], grads[m] = step(m)
            if rnd > 0 or m == "native":  # round 0 warms up; a native step is too slow to repeat for that
                times[m].append(t)
            print(f"round {rnd}: {m} {t:.2f} s", file=sys.stderr, flush=True)
    base = "native" if "native" in args.modes else args.modes[0]
    rows = []
    for m in args.modes:
        g = grads[m]
        rel = ((g - grads[base]).norm() / grads[base].norm()).item()
        rows.append(dict(mode=m, step_s=statistics.median(times[m]), samples=len(times[m]), loss=loss[m],
                         grad_rel_diff_vs=base, grad_rel_diff=rel))
    print(f"{args.model}, {args.batch_size}x{args.block_size} tokens, {torch.get_num_threads()} threads, "
          f"{precision.cpu_name()}")
    print(f"{'mode':<10} {'fwd+bwd s':>10} {'samples':>8} {'loss':>10} {'|g - g_' + base + '| / |g_' + base + '|':>24}")
    for r in rows:
        print(f"{r['mode']:<10} {r['step_s']:>10.2f} {r['samples']:>8} {r['loss']:>10.5f} {r['grad_rel_diff']:>24.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "tokens": args.batch_size * args.block_size, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "cpu": precision.cpu_name(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "native_bf16_products": precision.native_bf16_matmul("cpu"), "rows": rows, "times": times},
                  f, indent=2)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
