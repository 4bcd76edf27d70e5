"""``agip`` command line: ``agip finetune`` runs the whole job, ``agip eval`` measures a
checkpoint (or an export), ``agip export`` writes a pruned model as a compact file and
``agip unpack`` turns that back into a standard folder. ``agip finetune`` with no options runs the embedded default: SmolLM2-135M on
wiki-mini, 30% of the prunable weights, 60 steps."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .methods import METHODS
from .backends import BACKENDS
from .config import COMPENSATIONS, FISHER_MOMENTS, FISHER_POWERS, NM_MODES, PRESETS, SALIENCIES
from .baselines import INITS
from .train import FinetuneConfig


def _add_finetune(sub):
    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune while pruning; measure perplexity before and after",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="'smollm2-135m' (embedded), a local folder, or a hub name (e.g. gpt2)")
    p.add_argument("--dataset", default=d.dataset,
                   help="'wiki-mini' (embedded), 'wikitext-2-raw-v1' (needs a network), or a text file / folder")
    p.add_argument("--out", default=d.out, help="folder for the checkpoint, report and plots")
    p.add_argument("--method", default=d.method, choices=tuple(METHODS),
                   help="; ".join(f"{name}: {cls.help}" for name, cls in METHODS.items()))
    p.add_argument("--preset", default=d.preset, choices=tuple(PRESETS),
                   help="default: the product default (Fisher score, chosen on validation data); thesis: the "
                        "thesis' method exactly. Options given explicitly override the preset. "
                        + "; ".join(f"{k}: {v.options}, lr {v.harness_lr}" for k, v in PRESETS.items()))
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per training sequence")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr, help="default: the preset's")
    p.add_argument("--lr-warmup", type=float, default=d.lr_warmup, help="share of steps of linear LR warm-up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    p.add_argument("--target-sparsity", type=float, default=d.target_sparsity, help="share of the prunable weights")
    p.add_argument("--sparsity-pattern", default=d.sparsity_pattern,
                   help="'unstructured' or 'N:M' (e.g. 2:4: N of every M weights along the input; target <= N/M; "
                        "agip, magnitude, wanda, sparsegpt)")
    p.add_argument("--nm-mode", default=d.nm_mode, choices=NM_MODES,
                   help="N:M with agip: fixed (a pruned group stays pruned) or decay (the masks may change while "
                        "the weights outside them decay, cut at the end of the ramp)")
    p.add_argument("--nm-decay", type=float, default=d.nm_decay,
                   help="decay mode: the share a pruning step takes off the weights outside the masks, at R_target")
    p.add_argument("--nm-input-power", type=float, default=d.nm_input_power,
                   help="N:M with agip: multiply the score by each input's norm ||X_j||^q over the calibration "
                        "blocks (Wanda's norms); 0 = off, 0.5 = what the Fisher score's v^(1/4) leaves out")
    p.add_argument("--compensate", default=d.compensate, choices=COMPENSATIONS,
                   help="N:M with agip: obs moves the kept weights of each row when a pruning step cuts entries "
                        "(optimal brain surgeon from the training inputs' x^T x, as SparseGPT does one-shot)")
    p.add_argument("--init", default=d.init, choices=INITS,
                   help="agip: start from a one-shot solver at --target-sparsity (its weights and masks at step 0; "
                        "with --nm-mode decay the masks may still change): sparsegpt (AGIP's own, layer inputs' "
                        "second moment) or wanda")
    p.add_argument("--schedule", default=d.schedule, choices=("exp", "cubic", "oneshot"),
                   help="default: the preset's")
    p.add_argument("--ramp-end", type=float, default=d.ramp_end,
                   help="the cubic ramp reaches the target at this share of --steps")
    p.add_argument("--prune-interval", type=int, default=d.prune_interval, help="default: the preset's")
    p.add_argument("--saliency", default=d.saliency, choices=SALIENCIES,
                   help="taylor: |w g| (the thesis); fisher: |w| v^p from Adam's second moment. Default: the preset's")
    p.add_argument("--fisher-power", type=float, default=d.fisher_power, choices=sorted(FISHER_POWERS),
                   help="p of the Fisher score |w| v^p. Default: the preset's")
    p.add_argument("--fisher-moment", default=d.fisher_moment, choices=FISHER_MOMENTS,
                   help="the v of the Fisher score: current (v_t, with this step's gradient) or previous (v_(t-1), "
                        "histogrammed without a pass of its own). Default: the preset's")
    p.add_argument("--regrow-fraction", type=float, default=d.regrow_fraction)
    p.add_argument("--saliency-ema", type=float, default=d.saliency_ema)
    p.add_argument("--ta-gamma", type=float, default=d.ta_gamma,
                   help="terminal-attractor strength (0: off). Default: the preset's")
    p.add_argument("--ta-beta", type=float, default=d.ta_beta)
    p.add_argument("--ta-clip", type=float, default=d.ta_clip, help="norm bound C of the TA vector")
    p.add_argument("--ta-loss-floor", type=float, default=d.ta_loss_floor)
    p.add_argument("--stability", dest="stability", action="store_true", default=d.stability,
                   help="slow the sparsity ramp while the loss oscillates (default: the preset's)")
    p.add_argument("--no-stability", dest="stability", action="store_false", help="ramp sparsity regardless of the loss")
    p.add_argument("--backend", default=d.backend, choices=("auto",) + BACKENDS)
    p.add_argument("--fp32", dest="bf16", action="store_false", help="no autocast (fp32 forward and backward)")
    p.add_argument("--amp", default=d.amp, choices=("auto", "bf16", "fp16"),
                   help="the autocast dtype: 'auto' is bf16, except fp16 with a gradient scaler on a CUDA GPU "
                        "without bf16 units (a T4), where bf16 would run emulated")
    p.add_argument("--bf16-matmul", default=d.bf16_matmul, choices=("auto", "native", "emulated"),
                   help="bf16 autocast's matrix products: 'auto' emulates them in fp32 (bf16-rounded operands and "
                        "results) on a CPU without bf16 units, where native ones take minutes a step")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-split", default=d.eval_split, choices=("validation", "test"))
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len, help="L (default min(1024, context))")
    p.add_argument("--eval-stride", type=int, default=d.eval_stride, help="default L: non-overlapping windows")
    p.add_argument("--eval-max-tokens", type=int, default=d.eval_max_tokens, help="0 = the whole split")
    p.add_argument("--eval-validation", action="store_true", help="also measure the validation split at the end")
    p.add_argument("--eval-ood", default=d.eval_ood,
                   help="also measure an out-of-domain corpus before and after, e.g. 'pydoc' (Python's own docs)")
    p.add_argument("--gmp-events", type=int, default=d.gmp_events, help="gmp: how many times to re-prune")
    p.add_argument("--calibration-blocks", type=int, default=d.calibration_blocks,
                   help="wanda: train blocks used for the activation norms")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps; 0 = only at the end")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint, bit for bit")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--teacher", default=d.teacher,
                   help="distillation's frozen teacher: 'start' (the model before pruning; the default once "
                        "--distill-kl or --distill-hidden is on) or a model folder (e.g. a dense run's checkpoint)")
    p.add_argument("--distill-ce", type=float, default=d.distill_ce, help="weight of the cross-entropy term")
    p.add_argument("--distill-kl", type=float, default=d.distill_kl,
                   help="weight of T^2 KL(teacher || student) over the vocabulary (0: off)")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature, help="T of the KL term")
    p.add_argument("--distill-hidden", type=float, default=d.distill_hidden,
                   help="weight of SquareHead, the normalised MSE of every block's hidden states (0: off)")
    p.add_argument("--export", action="store_true", help="at the end, export the checkpoint to OUT/export (agip-sparse)")
    p.add_argument("--export-dtype", default=d.export_dtype, choices=("fp32", "bf16", "fp16"))
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity of a checkpoint (or any model)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder from `agip finetune`, an `agip export` folder, a model "
                   "folder, or a hub name")
    p.add_argument("--dataset", default="wiki-mini")
    p.add_argument("--split", default="test", choices=("validation", "test"))
    p.add_argument("--seq-len", type=int, default=None, help="L (default min(1024, context))")
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=16384, help="0 = the whole split")
    p.add_argument("--semi-structured", action="store_true",
                   help="also run the 2:4 linears on sparse tensor cores (CUDA, compute capability >= 8.0) and "
                        "report tokens/s against dense")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_export(sub):
    p = sub.add_parser("export", help="write a pruned model as a compact file (agip-sparse: bitmask + kept values) "
                       "or a standard dense folder", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="a checkpoint of `agip finetune` (OUT/checkpoint), or a save_pretrained folder with --masks zeros")
    p.add_argument("out", help="the folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default: fp32 (the checkpoint's)")
    p.add_argument("--format", default="agip-sparse", choices=("agip-sparse", "dense"),
                   help="agip-sparse: AGIP's own compact format (load with agip.load_sparse or `agip unpack`); "
                        "dense: a standard save_pretrained folder")
    p.add_argument("--masks", default=None, choices=("zeros",),
                   help="zeros: take the masks from w == 0 (a folder without AGIP's masks.safetensors)")
    p.add_argument("--overwrite", action="store_true")


def _add_unpack(sub):
    p = sub.add_parser("unpack", help="an agip-sparse export as a standard save_pretrained folder, for any other tool",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="a folder written by `agip export`")
    p.add_argument("out", help="the folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default: the export's")
    p.add_argument("--overwrite", action="store_true")


def run_export(args) -> dict:
    from .export import export

    res = export(args.src, args.out, dtype=args.dtype, format=args.format, masks=args.masks, overwrite=args.overwrite)
    found = f"; the masks from w == 0 found {res['zeros_found']:,} pruned entries" if args.masks == "zeros" else ""
    print(f"wrote {args.out} ({res['format']}, {res['dtype']}): {res['bytes']:,} bytes{found}")
    return res


def run_eval(args) -> dict:
    import torch

    from . import checkpoint
    from .export import is_sparse_export, load_sparse
    from .data import join, load_corpus
    from .evaluate import perplexity
    from .models import context_length, load_model
    from .train import tokenize

    if is_sparse_export(args.checkpoint):
        from transformers import AutoTokenizer

        # fp32 arithmetic, as for a checkpoint: a bf16 export is measured with its bf16-rounded weights
        model, tok = load_sparse(args.checkpoint, dtype=torch.float32), AutoTokenizer.from_pretrained(args.checkpoint)
    elif checkpoint.is_checkpoint(args.checkpoint):
        model, tok, _ = checkpoint.load_model(args.checkpoint)
    else:
        model, tok = load_model(args.checkpoint, flag="checkpoint")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    ctx = context_length(model)
    L = args.seq_len or min(1024, ctx)
    if L > ctx:
        raise ValueError(f"--seq-len {L} exceeds the model's context of {ctx} tokens")
    ids = tokenize(tok, join(load_corpus(args.dataset)[args.split]))
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    res = perplexity(model, ids, L, args.stride, progress=args.progress)
    weights = [p for n, p in model.named_parameters() if p.ndim >= 2]
    zeros = sum(int((p == 0).sum()) for p in weights)
    total = sum(p.numel() for p in model.parameters())
    print(f"perplexity on {args.dataset}/{args.split}: {res['ppl']:.3f} ({res['scored_tokens']:,} scored tokens of "
          f"{res['tokens']:,}, L={res['seq_len']}, stride={res['stride']}); zero weights: {zeros:,} of {total:,} "
          f"parameters ({100 * zeros / total:.2f}%)")
    if args.semi_structured:
        res["semi_structured"] = _semi_structured(model, ids, L, args)
    return res


def _semi_structured(model, ids, L, args):
    """Dense fp16 against 2:4 sparse tensor cores, the same windows: perplexity and tokens/s."""
    import time

    import torch

    from . import nm
    from .evaluate import perplexity

    why = nm.semi_structured_unsupported()
    if why:
        print(f"--semi-structured: not run: {why}")
        return None
    model.half()
    out = {}
    for kind in ("dense", "2:4"):
        if kind == "2:4":
            out["converted"] = nm.to_semi_structured(model)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = perplexity(model, ids, L, args.stride, progress=args.progress, desc=kind)
        torch.cuda.synchronize()
        out[kind] = {"ppl": r["ppl"], "tokens_per_s": r["scored_tokens"] / (time.perf_counter() - t0)}
    print(f"fp16, {out['converted']} linears as 2:4 sparse: perplexity {out['dense']['ppl']:.3f} dense / "
          f"{out['2:4']['ppl']:.3f} sparse; {out['dense']['tokens_per_s']:.0f} / {out['2:4']['tokens_per_s']:.0f} "
          f"tokens/s ({out['2:4']['tokens_per_s'] / out['dense']['tokens_per_s']:.2f}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="agip", description="Prune a language model while fine-tuning it.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_finetune(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_unpack(sub)
    args = ap.parse_args(argv)
    try:
        if args.command == "eval":
            run_eval(args)
            return 0
        if args.command == "export":
            run_export(args)
            return 0
        if args.command == "unpack":
            from .export import unpack

            print(f"wrote {unpack(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)}")
            return 0
        from .train import finetune, summary

        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        kw = {k: v for k, v in vars(args).items() if k in fields}
        if kw.get("max_grad_norm") == 0:
            kw["max_grad_norm"] = None
        if kw.get("eval_max_tokens") == 0:
            kw["eval_max_tokens"] = None
        report = finetune(FinetuneConfig(**kw))
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 speaks
            print(summary(report))
        return 0
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError, TypeError, ImportError) as e:
        print(f"agip: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
