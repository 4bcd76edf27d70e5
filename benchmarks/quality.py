"""Quality study: AGIP against the standard pruning baselines on the same model, data and
budget (the same steps, tokens, LR schedule and seed for every method).

Grid: dense fine-tuning; GMP (cubic, global magnitude); one-shot magnitude + fine-tuning;
Wanda without and with fine-tuning; AGIP with gamma = 0 (no TA), the default gamma = 1,
a strong TA (gamma = C picked from {10, 100} by validation perplexity at 50%), and AGIP
with regrowth; at 30% and 50% of the prunable weights; a second seed for dense, GMP and
AGIP at 50%. Writes JSON, a Markdown table and a plot of test perplexity against
sparsity.

    python benchmarks/quality.py                    # SmolLM2-135M on wiki-mini (about 45 min on 2 cores)
    python benchmarks/quality.py --quick --model DIR --dataset DIR   # a few steps: the tests run this
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agip.train import FinetuneConfig, finetune  # noqa: E402

STRONG = (10.0, 100.0)  # gamma = C candidates for the strong TA setting


DENSE = ("dense fine-tuning (AdamW)", "adamw", {"target_sparsity": 0.0})
GMP = ("GMP (cubic, magnitude)", "gmp", {})
AGIP_DEFAULT = ("AGIP (γ=1, C=1, default)", "agip", {})


def strong(gamma):
    return (f"AGIP strong TA (γ=C={gamma:g})", "agip", {"ta_gamma": gamma, "ta_clip": gamma})


def grid(targets, strong_gamma):
    """The runs after the sweep: (label, method, overrides, target, seed)."""
    methods = [GMP, ("one-shot magnitude + FT", "magnitude", {}), ("Wanda + FT", "wanda", {}),
               ("AGIP, no TA (γ=0)", "agip", {"ta_gamma": 0.0}), AGIP_DEFAULT,
               ("AGIP + regrowth (φ=0.05)", "agip", {"regrow_fraction": 0.05}), strong(strong_gamma)]
    top = max(targets)
    runs = [(*DENSE, 0.0, 0), (*DENSE, 0.0, 1)]
    runs += [(*m, t, 0) for m in methods for t in targets if not (m == strong(strong_gamma) and t == top)]
    runs += [(*GMP, top, 1), (*AGIP_DEFAULT, top, 1)]  # the second seed at the largest target
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wiki-mini")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality"))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-max-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=None)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--quick", action="store_true", help="2 steps, short evaluations: checks the pipeline only")
    ap.add_argument("--report-only", action="store_true", help="rebuild quality.md / quality.png from quality.json")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, "quality.json")) as f:
            data = json.load(f)
        write_outputs(data["rows"], data["settings"], args.out)
        return
    if args.quick:
        args.steps, args.eval_max_tokens = 2, min(args.eval_max_tokens, 512)
    os.makedirs(args.out, exist_ok=True)
    common = dict(model=args.model, dataset=args.dataset, steps=args.steps, batch_size=args.batch_size,
                  block_size=args.block_size, lr=args.lr, eval_max_tokens=args.eval_max_tokens,
                  eval_seq_len=args.eval_seq_len, progress=not args.quick)
    results = []

    def run(label, method, overrides, target, seed, validation=False):
        name = f"{len(results) + 1:02d}-{method}-r{int(100 * target)}-s{seed}"
        cfg = FinetuneConfig(**{**common, "method": method, "target_sparsity": target, "seed": seed,
                                "eval_validation": validation, "out": os.path.join(args.out, "runs", name),
                                **overrides})
        t0 = time.time()
        rep = finetune(cfg)
        row = {"label": label, "method": method, "target": target, "seed": seed, **overrides,
               "ppl_before": rep["ppl_before"]["ppl"], "ppl_test": rep["ppl_after"]["ppl"],
               "ppl_pruned": rep["ppl_pruned"]["ppl"] if rep.get("ppl_pruned") else None,
               "ppl_validation": rep["ppl_after_validation"]["ppl"] if rep.get("ppl_after_validation") else None,
               "sparsity_prunable": rep["sparsity_prunable"], "sparsity_all": rep["sparsity_all"],
               "wall_s": time.time() - t0, "tokens_per_s": rep["tokens_per_s"],
               "scored_tokens": rep["ppl_after"]["scored_tokens"], "seq_len": rep["ppl_after"]["seq_len"]}
        results.append(row)
        print(f"[{len(results)}] {label} r={target} seed={seed}: test ppl {row['ppl_test']:.3f}"
              + (f" (validation {row['ppl_validation']:.3f})" if row["ppl_validation"] else ""), flush=True)
        with open(os.path.join(args.out, "quality.json"), "w") as f:  # partial results survive a crash
            json.dump({"settings": common, "rows": results}, f, indent=2)
        return row

    # the strong-TA sweep, on the validation split at the largest target (its test
    # perplexity is that setting's row in the table)
    top = max(args.targets)
    sweep = {g: run(*strong(g), top, 0, validation=True) for g in STRONG}
    best = min(sweep, key=lambda g: sweep[g]["ppl_validation"])
    for label, method, overrides, target, seed in grid(args.targets, best):
        run(label, method, overrides, target, seed)
    write_outputs(results, common, args.out)


def write_outputs(rows, settings, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = rows[0]["ppl_before"]
    sweep = {r["ta_gamma"]: r for r in rows if r["ppl_validation"] is not None}
    best = min(sweep, key=lambda g: sweep[g]["ppl_validation"])
    lines = [
        f"Test perplexity on the first {settings['eval_max_tokens']:,} tokens of the test split "
        f"({rows[0]['scored_tokens']:,} scored, L={rows[0]['seq_len']}, non-overlapping windows); "
        f"{settings['steps']} steps × {settings['batch_size']}×{settings['block_size']} tokens for every method, "
        f"lr {settings['lr']} (linear warm-up and decay), seed 0 unless noted.",
        "",
        "| method | target | seed | test ppl | ppl right after one-shot pruning | sparsity prunable | sparsity all | wall s | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense model, before fine-tuning | 0 | - | {before:.3f} | | 0.00% | 0.00% | | |",
    ]
    for r in sorted(rows, key=lambda r: (r["target"], r["label"], r["seed"])):
        pruned = f"{r['ppl_pruned']:.3f}" if r["ppl_pruned"] else ""
        lines.append(f"| {r['label']} | {r['target']:.1f} | {r['seed']} | {r['ppl_test']:.3f} | {pruned} | "
                     f"{100 * r['sparsity_prunable']:.2f}% | {100 * r['sparsity_all']:.2f}% | {r['wall_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} |")
    lines += ["", "Strong-TA sweep at the largest target (validation perplexity, chosen: "
              f"γ=C={best:g}): " + ", ".join(f"γ=C={g:g}: {s['ppl_validation']:.3f}" for g, s in sweep.items())]
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.axhline(before, color="gray", ls=":", label="dense, before fine-tuning")
    dense = [r["ppl_test"] for r in rows if r["method"] == "adamw"]
    if dense:
        ax.axhline(sum(dense) / len(dense), color="black", ls="--", label="dense fine-tuning")
    by_label = {}
    for r in rows:
        if r["method"] != "adamw" and r["seed"] == 0:
            by_label.setdefault(r["label"], []).append((100 * r["sparsity_prunable"], r["ppl_test"]))
    for label, pts in by_label.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    wanda = sorted((100 * r["sparsity_prunable"], r["ppl_pruned"]) for r in rows if r["method"] == "wanda")
    if wanda:
        ax.plot([p[0] for p in wanda], [p[1] for p in wanda], "x--", label="Wanda, no fine-tuning")
    ax.set_xlabel("sparsity of the prunable weights (%)")
    ax.set_ylabel("test perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("perplexity against sparsity, same budget for every method")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality.png"), dpi=110)
    print("\n".join(lines))
    print(f"wrote {out}/quality.json, quality.md, quality.png")


if __name__ == "__main__":
    main()
