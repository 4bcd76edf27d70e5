"""AGIP's optimizer state per rank: bytes per parameter under DDP and FSDP2 (world sizes 1, 2, 8).

Computed from the buffers AGIP allocates (docs/design.md, "Several processes"), for every
world size asked, and measured for the world sizes it can launch here: ``torchrun`` starts
N processes (gloo on the CPU), each builds AGIP on the model (FSDP2: ``fully_shard`` per
block), takes one step, and reports the bytes of the tensors its optimizer holds. Prints a
table and writes JSON.

    python benchmarks/bench_memory.py                     # the embedded model, measured for 1 and 2
    python benchmarks/bench_memory.py --model DIR --measure 1 2 --worlds 1 2 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _checkout  # noqa: E402,F401  (this checkout's agip, its root off sys.path)


def optimizer_bytes(opt) -> dict:
    """The bytes of the tensors an AGIP optimizer holds on this rank, by kind."""
    out = {"m+v": 0, "mask": 0, "ema": 0, "w copy": 0, "histograms": 0}
    for b in opt._flat.buckets:
        out["m+v"] += b.m.nbytes + b.v.nbytes
        out["mask"] += b.mask.nbytes
        out["ema"] += b.ema.nbytes if b.ema is not None else 0
        # FSDP2's local shards are copied into the bucket; otherwise the bucket is the parameters
        out["w copy"] += sum(s.numel for s in b.slots if s.mirrored) * b.w.element_size()
    for state in opt._flat.scratch.values():  # the fused driver's histograms and kept keys
        out["histograms"] += state.nbytes()
    return out


def computed(n_params: int, n_prunable: int, world: int, fsdp: bool, elem: int = 4, ema: bool = False) -> dict:
    """The same kinds from the layout alone: m and v per local entry, a 1-byte mask per
    local prunable entry, a copy of the weights for FSDP2's shards; histograms fixed."""
    share = world if fsdp else 1  # FSDP2: each rank holds 1/world of every tensor (up to rounding)
    return {"m+v": 2 * elem * n_params / share, "mask": n_prunable / share, "ema": 4 * n_prunable / share if ema else 0,
            "w copy": elem * n_params / share if fsdp else 0, "histograms": 2 * 65536 * 4}


def worker(model_name: str, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import agip
    from agip.launch import shard_model, teardown
    from agip.models import load_model

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model, _ = load_model(model_name)
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "fsdp":
        shard_model(model)
        call = model
    else:
        call = torch.nn.parallel.DistributedDataParallel(model)
    opt = agip.AGIP(agip.param_groups(model), total_steps=2, warmup_steps=0)
    x = torch.randint(0, 100, (1, 16))
    call(x, labels=x).loss.backward()
    opt.step()  # a pruning step: the histograms exist
    rep = opt.sparsity_report()
    row = {"rank": dist.get_rank(), "world": dist.get_world_size(), "mode": mode, "n_params": n_params,
           "n_prunable": rep["n_prunable"], "bytes": optimizer_bytes(opt)}
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump(row, f)
    teardown(True)


def measure(model: str, world: int, mode: str) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               os.path.abspath(__file__), "--worker", mode, "--model", model, "--row", out]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if res.returncode != 0:
            raise SystemExit(f"torchrun failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        rows = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                rows.append(json.load(f))
        return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 8], help="world sizes to compute")
    ap.add_argument("--measure", type=int, nargs="*", default=[1, 2], help="world sizes to launch and measure")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_memory.json"))
    ap.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.model, args.worker, args.row)
    if any(w < 1 for w in args.worlds + args.measure):
        raise SystemExit("world sizes must be >= 1")
    measured = {(w, mode): measure(args.model, w, mode) for w in args.measure for mode in ("ddp", "fsdp")}
    any_rows = next(iter(measured.values()), None)
    if any_rows is None:
        raise SystemExit("measure at least one world size (the model's sizes come from a measured run)")
    n, n_p = any_rows[0]["n_params"], any_rows[0]["n_prunable"]
    table = []
    for w in sorted(set(args.worlds) | set(args.measure)):
        for mode in ("ddp", "fsdp"):
            c = computed(n, n_p, w, mode == "fsdp")
            row = {"world": w, "mode": mode, "computed_bytes_per_param": sum(v for k, v in c.items()
                                                                             if k != "histograms") / n,
                   "computed": c}
            if (w, mode) in measured:
                ranks = measured[(w, mode)]
                row["measured_bytes_per_param"] = [sum(v for k, v in r["bytes"].items() if k != "histograms") / n
                                                   for r in ranks]
                row["measured"] = [r["bytes"] for r in ranks]
            table.append(row)
    print(f"AGIP optimizer state per rank, bytes per parameter of the whole model ({n:,} parameters, {n_p:,} "
          "prunable; fp32; plus 512 KiB of histograms per rank)\n")
    print("| world size | DDP computed | DDP measured (per rank) | FSDP2 computed | FSDP2 measured (per rank) |")
    print("|---|---|---|---|---|")
    by = {(r["world"], r["mode"]): r for r in table}
    for w in sorted({r["world"] for r in table}):
        cells = []
        for mode in ("ddp", "fsdp"):
            r = by[(w, mode)]
            cells.append(f"{r['computed_bytes_per_param']:.3f}")
            cells.append(", ".join(f"{x:.3f}" for x in r["measured_bytes_per_param"]) if "measured" in r else "—")
        print(f"| {w} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "n_params": n, "n_prunable": n_p, "rows": table}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
