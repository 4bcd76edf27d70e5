"""Sizes, perplexity and load time of `agip export` for checkpoints of `agip finetune`.

For each checkpoint: the dense fp32 checkpoint's weights on disk, the agip-sparse export
in fp32 and in bf16 (and the dense bf16 folder), the perplexity of the checkpoint and of
each export by the harness' protocol (the same tokens, L and stride), and the median load
time of the checkpoint (``from_pretrained``) and of each export (``agip.load_sparse``).
Prints a table and writes JSON::

    python benchmarks/bench_export.py runs/s50/checkpoint runs/nm24/checkpoint --out benchmarks/results/export.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _checkout  # noqa: E402,F401  (this checkout's agip, its root off sys.path)

import torch  # noqa: E402

import agip  # noqa: E402
from agip import checkpoint, export  # noqa: E402
from agip.data import join, load_corpus  # noqa: E402
from agip.evaluate import perplexity  # noqa: E402
from agip.models import context_length  # noqa: E402
from agip.train import tokenize  # noqa: E402


def timed(load, reps):
    times, model = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        model = load()
        times.append(time.perf_counter() - t0)
    return model, statistics.median(times)


def measure(ckpt, dataset, max_tokens, reps, workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenize(tok, join(load_corpus(dataset)["test"]))[:max_tokens]
    rows = []

    def ppl(model):
        L = min(1024, context_length(model))
        return perplexity(model.float(), ids, L)["ppl"]  # bf16 weights, evaluated in fp32 arithmetic

    model, t = timed(lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), reps)
    rows.append({"what": "checkpoint (dense fp32, model.safetensors)", "bytes": os.path.getsize(
        os.path.join(ckpt, checkpoint.MODEL_FILE)), "ppl": ppl(model), "load_s": t})
    for fmt, dtype in (("agip-sparse", "fp32"), ("agip-sparse", "bf16"), ("dense", "bf16")):
        out = os.path.join(workdir, f"{os.path.basename(os.path.dirname(ckpt))}-{fmt}-{dtype}")
        res = export.export(ckpt, out, dtype=dtype, format=fmt, overwrite=True)
        if fmt == "dense":
            model, t = timed(lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16), reps)
        else:
            model, t = timed(lambda: agip.load_sparse(out), reps)
        rows.append({"what": f"export {fmt} {dtype}", "bytes": res["bytes"], "ppl": ppl(model), "load_s": t})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--dataset", default="wiki-mini")
    ap.add_argument("--max-tokens", type=int, default=16384, help="the harness' default --eval-max-tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "export.json"))
    args = ap.parse_args(argv)
    result = {}
    with tempfile.TemporaryDirectory() as work:
        for ckpt in args.checkpoints:
            if not checkpoint.is_checkpoint(ckpt):
                sys.exit(f"{ckpt} is not a checkpoint of agip finetune")
            result[ckpt] = measure(ckpt, args.dataset, args.max_tokens, args.reps, work)
    for ckpt, rows in result.items():
        print(f"\n{ckpt}")
        print(f"  {'':46s} {'MB on disk':>11s} {'x ckpt':>7s} {'perplexity':>11s} {'load s':>7s}")
        for r in rows:
            print(f"  {r['what']:46s} {r['bytes'] / 1e6:11.1f} {r['bytes'] / rows[0]['bytes']:7.3f} {r['ppl']:11.4f} "
                  f"{r['load_s']:7.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
