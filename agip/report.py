"""Run reports: ``report.json`` (everything), ``report.md`` (for people) and PNG plots
like the thesis' figures: the loss curve, the scheduled R_t against the achieved
sparsity, and a per-layer density heat map."""
from __future__ import annotations

import json
import os
from collections import defaultdict


def _layer_key(name: str):
    """(block index, projection) of a parameter name: ``model.layers.3.self_attn.q_proj.weight``
    -> (3, ``self_attn.q_proj``); None outside the blocks."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            kind = ".".join(p for p in parts[i + 1 :] if p != "weight")
            return int(part), kind or "weight"
    return None


def density_grid(layer_density: dict):
    """(block indices, projection names, rows of densities) for the heat map."""
    grid = defaultdict(dict)
    kinds = []
    for name, d in layer_density.items():
        key = _layer_key(name)
        if key is None:
            continue
        block, kind = key
        grid[block][kind] = d
        if kind not in kinds:
            kinds.append(kind)
    blocks = sorted(grid)
    return blocks, kinds, [[grid[b].get(k, float("nan")) for k in kinds] for b in blocks]


def plot(report: dict, out: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    hist = report["history"]
    steps = [h["step"] for h in hist]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in hist], lw=1, alpha=0.5, label="minibatch loss")
    k = max(1, len(hist) // 20)
    smooth = [sum(h["loss"] for h in hist[max(0, i - k + 1) : i + 1]) / len(hist[max(0, i - k + 1) : i + 1])
              for i in range(len(hist))]
    ax.plot(steps, smooth, lw=2, label=f"moving mean ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"{report['config']['method']}: training loss")
    ax.legend()
    fig.tight_layout()
    files.append(os.path.join(out, "loss.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [100 * h["scheduled_sparsity"] for h in hist], "--", label="scheduled $R_t$ (prunable)")
    ax.plot(steps, [100 * h["sparsity_prunable"] for h in hist], label="achieved, prunable weights")
    ax.plot(steps, [100 * h["sparsity_all"] for h in hist], label="achieved, all parameters")
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity (%)")
    ax.set_title("sparsity schedule and achieved sparsity")
    ax.legend()
    fig.tight_layout()
    files.append(os.path.join(out, "sparsity.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    blocks, kinds, rows = density_grid(report["layer_density"])
    if blocks:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.22 * len(blocks)))
        im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
        ax.set_yticks(range(len(blocks)), blocks)
        ax.set_ylabel("block")
        ax.set_title("density of each prunable matrix")
        fig.colorbar(im, ax=ax, label="share of weights kept")
        fig.tight_layout()
        files.append(os.path.join(out, "density.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def markdown(report: dict) -> str:
    b, a, c = report["ppl_before"], report["ppl_after"], report["config"]
    lines = [
        f"# AGIP run: {c['method']} on {report['model']} / {report['dataset']}",
        "",
        f"Perplexity on the {report['eval_split']} split: first {a['tokens']:,} tokens, windows of L = {a['seq_len']}, "
        f"stride {a['stride']}, {a['scored_tokens']:,} scored tokens.",
        "",
        "| | perplexity | sparsity (prunable) | sparsity (all params) |",
        "|---|---|---|---|",
        f"| before fine-tuning | {b['ppl']:.3f} | 0.0% | 0.0% |",
        *([f"| after one-shot {c['method']} pruning, before fine-tuning | {report['ppl_pruned']['ppl']:.3f} | "
           f"{100 * report['sparsity_prunable']:.2f}% | {100 * report['sparsity_all']:.2f}% |"]
          if report.get("ppl_pruned") else []),
        f"| after {c['steps']} steps | {a['ppl']:.3f} | {100 * report['sparsity_prunable']:.2f}% | "
        f"{100 * report['sparsity_all']:.2f}% |",
        "",
        f"- pruned {report['n_pruned']:,} of {report['n_prunable']:,} prunable weights "
        f"({report['n_params']:,} parameters in all); skipped steps: {report['skipped_steps']}",
        f"- trained {report['train_tokens']:,} tokens in {report['train_seconds']:.0f} s "
        f"({report['tokens_per_s']:.0f} tokens/s), optimizer backend `{report['backend']}`",
        f"- settings: lr {c['lr']}, target sparsity {c['target_sparsity']}, schedule {c['schedule']}, "
        f"TA γ {c['ta_gamma']} (β {c['ta_beta']}, C {c['ta_clip']}), regrowth {c['regrow_fraction']}, "
        f"batch {c['batch_size']}×{c['block_size']} tokens × {c['grad_accum']} accumulation, "
        f"autocast {report.get('autocast') or 'off (fp32)'}"
        f"{' with a gradient scaler (no bf16 units on this GPU, or --amp fp16)' if report.get('autocast') == 'fp16' else ''}"
        f"{' (products emulated in fp32: a CPU without bf16 units)' if report.get('bf16_products') == 'emulated' else ''}, "
        f"seed {c['seed']}",
        *([f"- export: `{report['export']['path']}` (agip-sparse, {report['export']['dtype']}): "
           f"{report['export']['bytes']:,} bytes on disk, {report['export']['ratio']:.2f}× the checkpoint's weights "
           f"({report['export']['checkpoint_bytes']:,} bytes)"] if report.get("export") else []),
        "",
        "![loss](loss.png)",
        "",
        "![sparsity](sparsity.png)",
        "",
        "![density](density.png)",
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    report["plots"] = plot(report, out)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
