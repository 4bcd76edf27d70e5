"""The fine-tuning harness: measure, fine-tune while pruning, measure again, save, report.

One function, :func:`finetune`, to be read top to bottom (nanoGPT's habit): no framework
of our own. ``agip finetune`` (agip/cli.py) is a thin argument parser around it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import checkpoint, distributed, methods
from .data import EVAL_ONLY, join, load_corpus
from .evaluate import perplexity
from .models import EMBEDDED, context_length, load_model
from .optimizer import PRESETS

METHODS = tuple(methods.METHODS)  # agip/methods.py: one object per method, the same hooks
# The harness' learning rate per preset (the optimizer's own default stays 5e-5): the
# thesis' 5e-5, and for the product default the lr chosen for dense fine-tuning on the
# validation split (README, "Quality study").
PRESET_LR = {"thesis": 5e-5, "default": 1e-4}


@dataclass
class FinetuneConfig:
    """Every knob of a run (``agip finetune --help`` lists the same, with defaults)."""

    model: str = EMBEDDED
    dataset: str = "wiki-mini"
    out: str = "runs/agip"
    method: str = "agip"
    preset: str = "default"  # "thesis": the thesis' method exactly (algorithm.md §5)
    steps: int = 60
    batch_size: int = 4
    block_size: int = 256
    grad_accum: int = 1
    lr: Optional[float] = None  # None: the preset's (PRESET_LR)
    lr_warmup: float = 0.05  # share of steps with a linear LR warm-up, then linear decay to 0
    weight_decay: float = 0.01
    max_grad_norm: Optional[float] = 1.0
    target_sparsity: float = 0.3
    sparsity_pattern: str = "unstructured"  # or "N:M", e.g. "2:4" (algorithm.md §2.5; method agip)
    schedule: Optional[str] = None  # None here and below: the preset's value
    prune_interval: Optional[int] = None
    regrow_fraction: float = 0.0
    saliency_ema: float = 0.0
    saliency: Optional[str] = None
    fisher_power: Optional[float] = None
    ta_gamma: Optional[float] = None
    ta_beta: float = 0.5
    ta_clip: float = 1.0
    ta_loss_floor: float = 0.0
    stability: Optional[bool] = None
    backend: str = "auto"
    bf16: bool = True  # autocast forward/backward in bf16; parameters and optimizer stay fp32
    seed: int = 0
    eval_split: str = "test"
    eval_seq_len: Optional[int] = None  # L; default min(1024, model context)
    eval_stride: Optional[int] = None  # default L (non-overlapping windows)
    eval_max_tokens: Optional[int] = 16384  # first N tokens of the split; None = all
    eval_validation: bool = False  # also measure the validation split after training (for sweeps)
    eval_ood: Optional[str] = None  # also measure an out-of-domain corpus (e.g. "pydoc") before and after
    gmp_events: int = 10  # GMP re-prunes this many times over the run (every steps // gmp_events)
    calibration_blocks: int = 32  # Wanda: train blocks whose activations give ||X_j||
    checkpoint_every: int = 0
    resume: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard) instead of DDP (docs/algorithm.md §6)
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.method in METHODS, f"--method must be one of {METHODS}, got {self.method!r}")
        need(self.preset in PRESETS, f"--preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        need(self.dataset not in EVAL_ONLY, f"--dataset {self.dataset} is for evaluation only (--eval-ood "
             f"{self.dataset}); train on wiki-mini, wikitext-2-raw-v1 or your own text")
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1 and self.block_size >= 2 and self.grad_accum >= 1,
             "--batch-size and --grad-accum must be >= 1 and --block-size >= 2")
        need(0 <= self.target_sparsity < 1, f"--target-sparsity must be in [0, 1), got {self.target_sparsity}")
        need(self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.lr_warmup < 1, f"--lr-warmup must be in [0, 1), got {self.lr_warmup}")
        need(self.eval_split in ("validation", "test"), f"--eval-split must be validation or test, got {self.eval_split!r}")
        need(self.eval_max_tokens is None or self.eval_max_tokens >= 2, "--eval-max-tokens must be >= 2 (or 0 for all)")
        need(self.checkpoint_every >= 0, "--checkpoint-every must be >= 0")
        need(self.sparsity_pattern == "unstructured" or self.method == "agip",
             f"--sparsity-pattern {self.sparsity_pattern} is AGIP's (--method agip); the baselines prune unstructured")
        need(not self.fsdp or self.method in ("agip", "adamw"),
             f"--fsdp runs --method agip or adamw; the baselines' masks ({self.method}) need whole weights: run "
             "them with DDP (torchrun without --fsdp) or in one process")


# Within one process (a study grid), a corpus is loaded once, and the perplexity of a
# freshly loaded model is measured once per protocol setting: both are pure functions of
# their keys.
_corpora: dict = {}
_fresh_ppl: dict = {}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # one long sequence: the protocol tokenizes the joined split once (no special tokens)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def get_rng_state() -> dict:
    """The CPU RNG state and, where CUDA is present, every device's: a resumed run draws the
    same dropout masks as an uninterrupted one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints written before the CUDA states were saved
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise RuntimeError(f"the checkpoint holds the RNG state of {len(state['cuda'])} CUDA device(s); resume "
                               "on a machine with as many for a bit-for-bit continuation")
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(cfg: FinetuneConfig):
    warm = max(1, int(cfg.lr_warmup * cfg.steps)) if cfg.lr_warmup > 0 else 0

    def f(step):  # the thesis' schedule: linear decay, here after a linear warm-up
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))

    return f


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning job; returns the report (also written to ``cfg.out``)."""
    cfg.check()
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=PRESET_LR[cfg.preset])
    from tqdm.auto import tqdm

    from .report import write_report

    # 0. several processes (torchrun): each rank trains on its part of every batch, under
    # DDP or FSDP2; rank 0 shows progress and writes the checkpoint and the report
    rank, world, device, started = distributed.init_from_env()
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over several processes: launch with torchrun --nproc_per_node N "
                         "(N >= 2), e.g. torchrun --nproc_per_node 2 -m agip.cli finetune --fsdp")
    if world > 1 and (cfg.resume or cfg.checkpoint_every):
        raise ValueError("--resume and --checkpoint-every run in one process only for now; with several processes "
                         "use agip.distributed.save_sharded / load_sharded from Python (docs/design.md)")
    show = cfg.progress and rank == 0
    torch.manual_seed(cfg.seed)
    ckpt_dir = os.path.join(cfg.out, "checkpoint")
    resuming = cfg.resume and checkpoint.is_checkpoint(ckpt_dir)
    if cfg.resume and not resuming:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume first")

    # 1. model, data, and the evaluation protocol's settings
    if resuming:
        model, tok, state = checkpoint.load_model(ckpt_dir)
    else:
        model, tok = load_model(cfg.model)
        state = {}
    model.to(device)
    ctx = context_length(model)
    L = cfg.eval_seq_len or min(1024, ctx)
    if L > ctx or cfg.block_size > ctx:
        raise ValueError(f"the model's context is {ctx} tokens: --eval-seq-len ({L}) and --block-size "
                         f"({cfg.block_size}) must not exceed it")
    stride = cfg.eval_stride or L

    def corpus(name: str) -> dict:
        if name not in _corpora:
            _corpora[name] = load_corpus(name)
        return _corpora[name]

    def eval_ids_of(name: str, split: str) -> torch.Tensor:
        ids = tokenize(tok, join(corpus(name)[split]))
        return ids[: cfg.eval_max_tokens] if cfg.eval_max_tokens else ids

    train_ids = tokenize(tok, join(corpus(cfg.dataset)["train"]))
    eval_ids = eval_ids_of(cfg.dataset, cfg.eval_split)
    n_blocks = train_ids.numel() // cfg.block_size
    if n_blocks < 1:
        raise ValueError(f"the train split has {train_ids.numel()} tokens, fewer than one block of {cfg.block_size}")
    blocks = train_ids[: n_blocks * cfg.block_size].view(n_blocks, cfg.block_size)

    def batch(step: int, micro: int, part: int = rank, parts: int = world) -> torch.Tensor:
        # sample i of the run is block order[epoch][i % n_blocks]: a pure function of the
        # step, so a resumed run reads exactly the batches it would have read; with several
        # processes each step's global batch has parts * batch_size blocks, part r is rank r's
        first = ((step * cfg.grad_accum + micro) * parts + part) * cfg.batch_size
        idx = []
        for i in range(first, first + cfg.batch_size):
            epoch, pos = divmod(i, n_blocks)
            order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.seed * 1000003 + epoch))
            idx.append(int(order[pos]))
        return blocks[idx].to(device)

    # 2. perplexity before fine-tuning (in domain, and out of domain if asked)
    def measure(name: str, split: str, ids: torch.Tensor, desc: str, fresh: bool = False) -> dict:
        key = (cfg.model, name, split, L, stride, cfg.eval_max_tokens)
        if fresh and key in _fresh_ppl:  # a freshly loaded model: measured once per process
            return _fresh_ppl[key]
        res = perplexity(model, ids, L, stride, progress=show, rank=rank, world=world, desc=desc)
        if fresh:
            _fresh_ppl[key] = res
        return res

    before = state.get("before") or measure(cfg.dataset, cfg.eval_split, eval_ids, "ppl before", fresh=True)
    ood_ids = eval_ids_of(cfg.eval_ood, cfg.eval_split) if cfg.eval_ood else None
    ood_before = state.get("ood_before")
    if cfg.eval_ood and ood_before is None:
        ood_before = measure(cfg.eval_ood, cfg.eval_split, ood_ids, f"ppl before ({cfg.eval_ood})", fresh=True)

    # 3. the method, its optimizer, the LR schedule, resume (FSDP2 shards the model before
    # the optimizer is built on its shards; DDP wraps it for training only)
    train_model = model
    if cfg.fsdp:
        distributed.shard_model(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    method = methods.make(cfg)
    opt = method.optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    history, start, train_time = state.get("history", []), 0, state.get("train_seconds", 0.0)
    if resuming:
        blob = checkpoint.load_training_state(ckpt_dir)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        start = state["step"]

    pruned = state.get("ppl_pruned")
    if not resuming:  # one-shot methods prune here, then the mask stays fixed

        def calibration():  # the same blocks on every rank: every rank finds the same masks
            return [batch(i, 0, 0, 1) for i in range(max(1, cfg.calibration_blocks // cfg.batch_size))]

        if method.before_training(model, opt, calibration):
            pruned = perplexity(model, eval_ids, L, stride, progress=show, rank=rank, world=world, desc="ppl pruned")

    def save_checkpoint(step):
        state = {"step": step, "before": before, "ood_before": ood_before, "ppl_pruned": pruned,
                 "history": history, "train_seconds": train_time, "config": dataclasses.asdict(cfg)}
        if world > 1:  # one whole checkpoint (weights and masks) from rank 0, no optimizer state
            distributed.save_full(ckpt_dir, model, tok, opt, state=state)
        else:
            checkpoint.save(ckpt_dir, model, tok, opt, sched, rng=get_rng_state(), state=state)

    # 4. the training loop
    model.train()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size * world
    bar = tqdm(range(start, cfg.steps), desc=f"fine-tune ({cfg.method}{f', {world} processes' if world > 1 else ''})",
               initial=start, total=cfg.steps, disable=not show)
    for step in bar:
        t0 = time.perf_counter()
        losses = []
        for micro in range(cfg.grad_accum):
            x = batch(step, micro)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = train_model(x, labels=x).loss
            (loss / cfg.grad_accum).backward()
            losses.append(loss.item())
        # docs/algorithm.md §0, §6: the mean of the micro-batch losses, over all ranks (the
        # optimizer's own mean over ranks then changes nothing)
        E = distributed.mean_over_ranks(sum(losses) / len(losses), device)
        lr = sched.get_last_lr()[0]
        opt.step(loss=E)
        sched.step()
        method.after_step(step + 1, opt)  # before zero_grad: PLATON's score reads the step's gradient
        opt.zero_grad()
        dt = time.perf_counter() - t0
        train_time += dt
        rep = opt.sparsity_report()
        history.append({"step": step + 1, "loss": E, "lr": lr, "scheduled_sparsity": method.scheduled(step + 1, rep),
                        "sparsity_prunable": rep["sparsity_prunable"], "sparsity_all": rep["sparsity_all"],
                        "tokens_per_s": tokens_per_step / dt})
        bar.set_postfix(loss=f"{E:.3f}", R=f"{rep['scheduled_sparsity']:.3f}",
                        sparsity=f"{rep['sparsity_prunable']:.3f}", tok_s=f"{tokens_per_step / dt:.0f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(step + 1)

    # 5. perplexity after, checkpoint, report
    after = perplexity(model, eval_ids, L, stride, progress=show, rank=rank, world=world, desc="ppl after")
    after_validation = ood_after = ood_after_validation = None
    if cfg.eval_validation:
        after_validation = measure(cfg.dataset, "validation", eval_ids_of(cfg.dataset, "validation"), "ppl validation")
    if cfg.eval_ood:
        ood_after = measure(cfg.eval_ood, cfg.eval_split, ood_ids, f"ppl after ({cfg.eval_ood})")
        if cfg.eval_validation:
            ood_after_validation = measure(cfg.eval_ood, "validation", eval_ids_of(cfg.eval_ood, "validation"),
                                           f"ppl validation ({cfg.eval_ood})")
    save_checkpoint(cfg.steps)
    final = opt.sparsity_report()
    report = {
        "config": dataclasses.asdict(cfg),
        "model": cfg.model, "dataset": cfg.dataset, "eval_split": cfg.eval_split,
        "ppl_before": before, "ppl_pruned": pruned, "ppl_after": after, "ppl_after_validation": after_validation,
        "ood": cfg.eval_ood, "ood_before": ood_before, "ood_after": ood_after,
        "ood_after_validation": ood_after_validation,
        "sparsity_prunable": final["sparsity_prunable"], "sparsity_all": final["sparsity_all"],
        "n_prunable": final["n_prunable"], "n_params": final["n_params"], "n_pruned": final["n_pruned"],
        "skipped_steps": final["skipped_steps"], "layer_density": final["layer_density"],
        "train_seconds": train_time, "tokens_per_s": tokens_per_step * len(history) / max(train_time, 1e-9),
        "train_tokens": tokens_per_step * cfg.steps, "backend": opt.backend.__name__.rsplit(".", 1)[-1],
        "history": history, "checkpoint": ckpt_dir,
    }
    if rank == 0:
        write_report(report, cfg.out)
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
    return report


def summary(report: dict) -> str:
    """The lines `agip finetune` prints at the end."""
    b, a = report["ppl_before"], report["ppl_after"]
    return "\n".join([
        f"perplexity on {report['dataset']}/{report['eval_split']} ({a['scored_tokens']:,} scored tokens, "
        f"L={a['seq_len']}, stride={a['stride']}): before {b['ppl']:.2f} -> after {a['ppl']:.2f}",
        *([f"right after one-shot pruning (before fine-tuning): {report['ppl_pruned']['ppl']:.2f}"]
          if report.get("ppl_pruned") else []),
        *([f"out of domain, {report['ood']}/{report['eval_split']} ({report['ood_after']['scored_tokens']:,} scored "
           f"tokens): before {report['ood_before']['ppl']:.2f} -> after {report['ood_after']['ppl']:.2f}"]
          if report.get("ood_after") else []),
        f"sparsity: {100 * report['sparsity_prunable']:.1f}% of the prunable weights "
        f"({report['n_pruned']:,} of {report['n_prunable']:,}), {100 * report['sparsity_all']:.1f}% of all "
        f"{report['n_params']:,} parameters",
        f"trained {report['train_tokens']:,} tokens in {report['train_seconds']:.0f} s "
        f"({report['tokens_per_s']:.0f} tokens/s, backend {report['backend']})",
        f"report: {os.path.join(report['config']['out'], 'report.md')} (+ report.json, *.png); "
        f"checkpoint: {report['checkpoint']}",
    ])
