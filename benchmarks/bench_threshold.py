"""Exact global threshold: AGIP's radix select against ``torch.kthvalue``.

On N saliencies (default 106,168,320: SmolLM2-135M's prunable weights) with k = floor(0.3 N):
``torch.kthvalue`` on the precomputed S = |w g| (the reference backend's method) against
each fused backend's pass A + select, which also computes S and G^2 from w and g, once
as on a first pruning step (full histogram) and once as on later steps (the histogram
only below the previous theta, here the same one). Checks that every method returns the
same theta; prints medians and writes JSON.

    python benchmarks/bench_threshold.py                 # CPU, 106M
    python benchmarks/bench_threshold.py --n 10000000 --reps 3
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from agip import backends
from agip.backends import GroupHyper, StepPlan
from agip.flat import FlatState

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import device_name, runs_on, time_interleaved  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=106_168_320)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", help="fused backends to time (default: those that run here)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.n < 1 or not 0 < args.ratio < 1 or args.reps < 1:
        sys.exit("--n must be >= 1, --ratio in (0, 1), --reps >= 1")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.n, generator=gen) * 0.02).to(device)
    g = (torch.randn(args.n, generator=gen) * 1e-3).to(device)
    k = int(math.floor(args.ratio * args.n))
    names = args.backends or [b for b in backends.available() if b != "reference" and runs_on(b, device)]

    rows = {}
    s = (w * g).abs()

    def kth():  # on the device the saliencies live on (torch.kthvalue runs on CUDA too)
        return float(torch.kthvalue(s, k).values)

    rows["torch.kthvalue"] = kth
    for name in names:
        module = backends.resolve(name, device)
        p = torch.nn.Parameter(w.clone())
        flat = FlatState([{"params": [p], "prune": True}], saliency_ema=False)
        flat.buckets[0].g.copy_(g)
        plan = StepPlan(step=1, clip=1.0, ta_scale=0.0, groups=[GroupHyper(0.0, 0.0, 0.9, 0.999, 1e-8)],
                        prune=True, k=k)

        def select(module=module, flat=flat, plan=plan, name=name, cold=False):
            if cold:  # no previous theta: the first pruning step histograms every entry
                if name in flat.scratch:
                    flat.scratch[name].forget_theta()
            module.grad_sumsq(flat, plan)
            return module.select(flat, plan).theta

        rows[f"{name}: first pruning step"] = lambda select=select: select(cold=True)
        rows[f"{name}: later steps"] = select  # window below the previous theta
    thetas = {name: fn() for name, fn in rows.items()}  # warm-up, and the answers
    if len(set(thetas.values())) != 1:
        sys.exit(f"methods disagree on theta: {thetas}")
    medians = time_interleaved(rows, args.reps, device)
    base = medians["torch.kthvalue"]
    print(f"device: {device_name(device)}   N = {args.n:,}   k = {k:,}   theta = {thetas['torch.kthvalue']!r} (all agree)")
    print(f"{'method':<32} {'median s':>10} {'speed-up vs kthvalue':>22}")
    out_rows = []
    for name, med in medians.items():
        print(f"{name:<32} {med:>10.4f} {base / med:>22.1f}")
        out_rows.append(dict(method=name, median_s=med, speedup_vs_kthvalue=base / med))
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"bench_threshold-{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": device_name(device), "n": args.n, "k": k, "reps": args.reps, "rows": out_rows}, f, indent=2)
    print(f"wrote {out}")
    return out_rows


if __name__ == "__main__":
    main()
