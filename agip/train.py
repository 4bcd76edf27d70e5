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

from . import backends, checkpoint, launch, methods, precision
from .baselines import INITS
from .config import PRESETS, Config
from .data import EVAL_ONLY, check_corpus_name, join, load_corpus
from .evaluate import perplexity
from .models import EMBEDDED, check_model_name, context_length, load_model

METHODS = tuple(methods.METHODS)  # agip/methods.py: one object per method, the same hooks


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
    lr: Optional[float] = None  # None: the preset's (agip.config.PRESETS, harness_lr)
    lr_warmup: float = 0.05  # share of steps with a linear LR warm-up, then linear decay to 0
    weight_decay: float = 0.01
    max_grad_norm: Optional[float] = 1.0
    target_sparsity: float = 0.3
    sparsity_pattern: str = "unstructured"  # or "N:M", e.g. "2:4" (algorithm.md §2.5; agip, magnitude, wanda, sparsegpt)
    nm_mode: str = "fixed"  # N:M: "fixed" (a pruned group stays pruned) or "decay" (masks change; §2.5b)
    nm_decay: float = 0.1
    compensate: str = "none"  # N:M with agip: "obs" moves the kept weights of a row when a step cuts (§2.6)
    nm_input_power: float = 0.0  # N:M with agip: scores times ||X_j||^q from the calibration blocks (§2.5c)
    init: Optional[str] = None  # agip: start from a one-shot solver, "sparsegpt" or "wanda" (algorithm.md §2.6)
    schedule: Optional[str] = None  # None here and below: the preset's value
    ramp_end: float = 0.75  # the cubic ramp reaches the target at ramp_end * steps
    prune_interval: Optional[int] = None
    regrow_fraction: float = 0.0
    saliency_ema: float = 0.0
    saliency: Optional[str] = None
    fisher_power: Optional[float] = None
    fisher_moment: Optional[str] = None  # "current" (v_t) or "previous" (v_(t-1)); algorithm.md §2.1b
    ta_gamma: Optional[float] = None
    ta_beta: float = 0.5
    ta_clip: float = 1.0
    ta_loss_floor: float = 0.0
    stability: Optional[bool] = None
    backend: str = "auto"
    bf16: bool = True  # autocast forward/backward (bf16, or fp16 per amp); parameters and optimizer stay fp32
    amp: str = "auto"  # autocast dtype: "auto" = bf16, fp16 + a gradient scaler on a CUDA GPU without bf16 units
    bf16_matmul: str = "auto"  # "auto": emulate bf16 products on a CPU without bf16 units (agip/precision.py)
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
    teacher: Optional[str] = None  # distillation (algorithm.md §7): "start" or a model folder; None: "start" if on
    distill_ce: float = 1.0  # the weights of the loss' terms; kl = hidden = 0: no teacher, plain CE
    distill_kl: float = 0.0
    distill_temperature: float = 1.0
    distill_hidden: float = 0.0
    export: bool = False  # at the end, export the checkpoint to OUT/export (agip-sparse; agip/export.py)
    export_dtype: str = "fp32"

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
        need(self.sparsity_pattern == "unstructured" or methods.METHODS[self.method].takes_nm,
             f"--sparsity-pattern {self.sparsity_pattern}: --method {self.method} prunes unstructured only (N:M: "
             f"{', '.join(n for n, c in methods.METHODS.items() if c.takes_nm)})")
        if self.sparsity_pattern != "unstructured" and self.method != "agip":
            from .nm import nm_of

            nm_of(self.sparsity_pattern, self.target_sparsity)  # a one-shot N:M mask prunes exactly N/M
        need(self.compensate == "none" or self.method == "agip", f"--compensate is for --method agip, not "
             f"{self.method}")
        need(self.nm_input_power == 0 or self.method == "agip", f"--nm-input-power is for --method agip (its N:M "
             f"score; Wanda's masks use the input norms already), not {self.method}")
        need(self.init is None or (self.init in INITS and self.method == "agip"),
             f"--init must be one of {INITS} and is for --method agip (the baselines are one-shot already), got "
             f"--init {self.init} with --method {self.method}")
        need(self.init is None or (self.target_sparsity > 0 and not self.fsdp), "--init prunes one-shot to "
             "--target-sparsity before training: give a target > 0, and run it with DDP or in one process (the "
             "solver needs whole weights, not FSDP2 shards)")
        need(not self.fsdp or self.method in ("agip", "adamw"),
             f"--fsdp runs --method agip or adamw; the baselines' masks ({self.method}) need whole weights: run "
             "them with DDP (torchrun without --fsdp) or in one process")
        need(self.backend in backends.BACKENDS + ("auto",),
             f"--backend must be 'auto' or one of {backends.BACKENDS}, got {self.backend!r}")
        need(self.bf16_matmul in precision.MODES, f"--bf16-matmul must be one of {precision.MODES}, got "
             f"{self.bf16_matmul!r}")
        need(self.amp in precision.AMPS, f"--amp must be one of {precision.AMPS}, got {self.amp!r}")
        need(not (self.fsdp and self.amp == "fp16"), "--amp fp16 needs a gradient scaler, which FSDP2's sharded "
             "gradients do not take here: run FSDP2 in bf16 (a GPU with bf16 units) or with --fp32")
        need(self.export_dtype in ("fp32", "bf16", "fp16"), f"--export-dtype must be fp32, bf16 or fp16, got "
             f"{self.export_dtype!r}")
        need(all(w >= 0 for w in (self.distill_ce, self.distill_kl, self.distill_hidden)) and
             self.distill_ce + self.distill_kl + self.distill_hidden > 0,
             "--distill-ce, --distill-kl and --distill-hidden must be >= 0 and not all 0")
        need(self.distill_temperature > 0, f"--distill-temperature must be > 0, got {self.distill_temperature}")
        need(self.teacher is None or self.distilling, f"--teacher {self.teacher} without --distill-kl or "
             "--distill-hidden does nothing: give one of them a weight > 0")
        need(self.distilling or self.distill_ce == 1.0, "--distill-ce without a teacher's term (--distill-kl, "
             "--distill-hidden) only scales the loss: leave it at 1, or scale --lr")
        check_model_name(self.model, "--model")
        if self.teacher not in (None, "start"):  # checked before the student loads
            check_model_name(self.teacher, "--teacher")
        check_corpus_name(self.dataset)
        if self.eval_ood:
            check_corpus_name(self.eval_ood)
        if self.method == "agip":  # the optimizer's own checks (patterns, targets, TA...), before any loading
            Config.resolve(**self.agip_options())

    @property
    def distilling(self) -> bool:
        """Whether the loss has a teacher's term (algorithm.md §7)."""
        return self.distill_kl > 0 or self.distill_hidden > 0

    def agip_options(self) -> dict:
        """The AGIP optimizer's options of this run (agip.AGIP's keyword arguments beyond lr,
        weight_decay and backend)."""
        return dict(preset=self.preset, max_grad_norm=self.max_grad_norm, ta_gamma=self.ta_gamma,
                    ta_beta=self.ta_beta, ta_clip=self.ta_clip, ta_loss_floor=self.ta_loss_floor,
                    target_sparsity=self.target_sparsity, schedule=self.schedule, total_steps=self.steps,
                    prune_interval=self.prune_interval, regrow_fraction=self.regrow_fraction,
                    saliency_ema=self.saliency_ema, stability=self.stability, saliency=self.saliency,
                    fisher_power=self.fisher_power, fisher_moment=self.fisher_moment,
                    sparsity_pattern=self.sparsity_pattern, nm_mode=self.nm_mode, nm_decay=self.nm_decay,
                    ramp_end=self.ramp_end, nm_input_power=self.nm_input_power, compensate=self.compensate)


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


class EvalCache:
    """What the runs of one process (a study grid) share: each corpus, loaded once, and the
    perplexity of a freshly loaded model per protocol setting (both pure functions of their
    keys). Pass one to several :func:`finetune` calls; each call makes its own otherwise."""

    def __init__(self):
        self.corpora: dict = {}
        self.fresh: dict = {}

    def corpus(self, name: str) -> dict:
        if name not in self.corpora:
            self.corpora[name] = load_corpus(name)
        return self.corpora[name]


class Batches:
    """The training batches: sample i of the run is block ``order[epoch][i % n_blocks]``, a
    pure function of the step, so a resumed run reads exactly the batches it would have
    read; with several processes each step's global batch has ``world * batch_size``
    blocks, part r being rank r's."""

    def __init__(self, train_ids: torch.Tensor, cfg: FinetuneConfig, rank: int, world: int, device):
        self.n_blocks = train_ids.numel() // cfg.block_size
        if self.n_blocks < 1:
            raise ValueError(f"the train split has {train_ids.numel()} tokens, fewer than one block of {cfg.block_size}")
        self.blocks = train_ids[: self.n_blocks * cfg.block_size].view(self.n_blocks, cfg.block_size)
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device

    def __call__(self, step: int, micro: int, part: Optional[int] = None, parts: Optional[int] = None):
        cfg = self.cfg
        part, parts = (self.rank, self.world) if part is None else (part, parts)
        first = ((step * cfg.grad_accum + micro) * parts + part) * cfg.batch_size
        idx = []
        for i in range(first, first + cfg.batch_size):
            epoch, pos = divmod(i, self.n_blocks)
            order = torch.randperm(self.n_blocks, generator=torch.Generator().manual_seed(cfg.seed * 1000003 + epoch))
            idx.append(int(order[pos]))
        return self.blocks[idx].to(self.device)

    def calibration(self) -> list:
        """The calibration blocks of one-shot baselines: the same on every rank, so every rank
        finds the same masks."""
        return [self(i, 0, 0, 1) for i in range(max(1, self.cfg.calibration_blocks // self.cfg.batch_size))]


class Evaluator:
    """Perplexity by docs/design.md's protocol for one run: owns L, the stride, the token ids
    of each (corpus, split) and the cache of a freshly loaded model's figures."""

    def __init__(self, cfg: FinetuneConfig, model, tok, rank: int, world: int, show: bool, cache: EvalCache):
        ctx = context_length(model)
        self.L = cfg.eval_seq_len or min(1024, ctx)
        if self.L > ctx or cfg.block_size > ctx:
            raise ValueError(f"the model's context is {ctx} tokens: --eval-seq-len ({self.L}) and --block-size "
                             f"({cfg.block_size}) must not exceed it")
        self.stride = cfg.eval_stride or self.L
        self.cfg, self.model, self.tok, self.rank, self.world, self.show, self.cache = cfg, model, tok, rank, world, show, cache
        self._ids: dict = {}

    def ids(self, name: str, split: str) -> torch.Tensor:
        if (name, split) not in self._ids:
            ids = tokenize(self.tok, join(self.cache.corpus(name)[split]))
            self._ids[name, split] = ids[: self.cfg.eval_max_tokens] if self.cfg.eval_max_tokens else ids
        return self._ids[name, split]

    def __call__(self, name: str, split: str, desc: str, fresh: bool = False) -> dict:
        key = (self.cfg.model, name, split, self.L, self.stride, self.cfg.eval_max_tokens)
        if fresh and key in self.cache.fresh:  # a freshly loaded model: measured once per process
            return self.cache.fresh[key]
        res = perplexity(self.model, self.ids(name, split), self.L, self.stride, progress=self.show, rank=self.rank,
                         world=self.world, desc=desc)
        if fresh:
            self.cache.fresh[key] = res
        return res

    def after(self) -> dict:
        """The figures after training: in domain, and where asked validation and out of domain."""
        cfg, out = self.cfg, {"ppl_after": self(self.cfg.dataset, self.cfg.eval_split, "ppl after")}
        out["ppl_after_validation"] = self(cfg.dataset, "validation", "ppl validation") if cfg.eval_validation else None
        out["ood_after"] = self(cfg.eval_ood, cfg.eval_split, f"ppl after ({cfg.eval_ood})") if cfg.eval_ood else None
        out["ood_after_validation"] = (self(cfg.eval_ood, "validation", f"ppl validation ({cfg.eval_ood})")
                                       if cfg.eval_ood and cfg.eval_validation else None)
        return out


@dataclass
class RunState:
    """What a run has done so far (``trainer_state.json`` of its checkpoints, with the config)."""

    step: int = 0
    before: Optional[dict] = None
    ood_before: Optional[dict] = None
    ppl_pruned: Optional[dict] = None
    history: list = field(default_factory=list)
    train_seconds: float = 0.0

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

    def record(self, step: int, loss: float, rep: dict, lr: float, scheduled: float, tokens: int,
               seconds: float) -> None:
        self.step, self.train_seconds = step, self.train_seconds + seconds
        self.history.append({"step": step, "loss": loss, "lr": lr, "scheduled_sparsity": scheduled,
                             "sparsity_prunable": rep["sparsity_prunable"], "sparsity_all": rep["sparsity_all"],
                             "tokens_per_s": tokens / seconds})


def save_run(cfg: FinetuneConfig, run: RunState, model, tok, opt, sched, world: int) -> str:
    """The run's checkpoint (atomic; agip/checkpoint.py). With several processes: one whole
    checkpoint (weights and masks) from rank 0, no optimizer state."""
    path, state = os.path.join(cfg.out, "checkpoint"), {**dataclasses.asdict(run), "config": dataclasses.asdict(cfg)}
    if world > 1:
        checkpoint.save_full(path, model, tok, opt, state=state)
    else:
        checkpoint.save(path, model, tok, opt, sched, rng=get_rng_state(), state=state)
    return path


def export_run(cfg: FinetuneConfig, ckpt: str) -> Optional[dict]:
    """With ``--export``: the checkpoint as an agip-sparse folder (OUT/export), and the sizes
    on disk of the checkpoint's weights and of the export."""
    if not cfg.export:
        return None
    from .export import export

    res = export(ckpt, os.path.join(cfg.out, "export"), dtype=cfg.export_dtype, overwrite=True)
    dense = os.path.getsize(os.path.join(ckpt, checkpoint.MODEL_FILE))
    return {"path": os.path.join(cfg.out, "export"), "dtype": res["dtype"], "bytes": res["bytes"],
            "checkpoint_bytes": dense, "ratio": res["bytes"] / dense}


def build_report(cfg: FinetuneConfig, run: RunState, final: dict, after: dict, tokens_per_step: int, backend: str,
                 ckpt: str, device: torch.device, loss_fn=None) -> dict:
    """The run's report (``report.json``; agip/report.py draws and writes it); ``loss_fn``:
    the run's :class:`agip.distill.DistillLoss`, if it distilled."""
    half = precision.amp_dtype(cfg.amp, device) if cfg.bf16 else None  # the autocast dtype the loop took
    return {
        "config": dataclasses.asdict(cfg),
        "model": cfg.model, "dataset": cfg.dataset, "eval_split": cfg.eval_split,
        "ppl_before": run.before, "ppl_pruned": run.ppl_pruned, "ppl_after": after["ppl_after"],
        "ppl_after_validation": after["ppl_after_validation"],
        "ood": cfg.eval_ood, "ood_before": run.ood_before, "ood_after": after["ood_after"],
        "ood_after_validation": after["ood_after_validation"],
        "sparsity_prunable": final["sparsity_prunable"], "sparsity_all": final["sparsity_all"],
        "n_prunable": final["n_prunable"], "n_params": final["n_params"], "n_pruned": final["n_pruned"],
        "skipped_steps": final["skipped_steps"], "layer_density": final["layer_density"],
        "train_seconds": run.train_seconds,
        "tokens_per_s": tokens_per_step * len(run.history) / max(run.train_seconds, 1e-9),
        "train_tokens": tokens_per_step * cfg.steps, "backend": backend, "history": run.history, "checkpoint": ckpt,
        "peak_memory_bytes": peak_memory(),
        "autocast": {torch.bfloat16: "bf16", torch.float16: "fp16", None: None}[half],
        "bf16_products": precision.resolve(cfg.bf16_matmul, device) if half == torch.bfloat16 else None,
        # distilled: CE and KL in one pass over the logits (True), or the model's own CE beside the KL
        "distill_ce_shared": loss_fn.fuses if loss_fn is not None else None,
    }


def peak_memory() -> int:
    """The process' peak memory so far: on CUDA the allocator's peak, else the peak resident
    set size (which includes evaluation and the loaded corpora)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:  # Linux: this process' own high-water mark (ru_maxrss keeps the parent's across fork + exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux, bytes on macOS


def finetune(cfg: FinetuneConfig, cache: Optional[EvalCache] = None) -> dict:
    """Run one fine-tuning job; returns the report (also written to ``cfg.out``)."""
    cfg.check()  # every option, before anything is loaded
    cfg = cfg if cfg.lr is not None else dataclasses.replace(cfg, lr=PRESETS[cfg.preset].harness_lr)
    from tqdm.auto import tqdm

    from .report import write_report

    # 0. several processes (torchrun): each rank trains on its part of every batch, under
    # DDP or FSDP2; rank 0 shows progress and writes the checkpoint and the report
    rank, world, device, started = launch.init_from_env()
    try:
        launch.check_world(cfg, world)
        show, ckpt = cfg.progress and rank == 0, os.path.join(cfg.out, "checkpoint")
        resuming = cfg.resume and checkpoint.is_checkpoint(ckpt)
        if cfg.resume and not resuming:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}; run without --resume first")
        torch.manual_seed(cfg.seed)

        # 1. model, data, and the evaluation protocol's settings
        model, tok, saved = checkpoint.load_model(ckpt) if resuming else (*load_model(cfg.model), {})
        model.to(device)
        # the teacher (distillation, algorithm.md §7): "start" is the model before pruning and
        # fine-tuning, which a resumed run loads afresh; frozen, in bf16
        loss_fn = None
        if cfg.distilling:
            from . import distill

            spec = cfg.teacher or "start"
            if spec == "start":
                teacher = distill.load_teacher("start", load_model(cfg.model)[0] if resuming else model, device=device)
            else:  # a folder, a hub name or the embedded default, by the harness' own loader
                teacher = distill.load_teacher(load_model(spec, flag="--teacher")[0], device=device)
            distill.check_teacher(teacher, model)
            loss_fn = distill.DistillLoss(launch.wrap(teacher, True, world, device) if cfg.fsdp else teacher,
                                          ce=cfg.distill_ce, kl=cfg.distill_kl, temperature=cfg.distill_temperature,
                                          hidden=cfg.distill_hidden)
        run = RunState.from_dict(saved)
        ev = Evaluator(cfg, model, tok, rank, world, show, cache or EvalCache())
        batches = Batches(tokenize(tok, join(ev.cache.corpus(cfg.dataset)["train"])), cfg, rank, world, device)

        # 2. perplexity before fine-tuning (in domain, and out of domain if asked)
        run.before = run.before or ev(cfg.dataset, cfg.eval_split, "ppl before", fresh=True)
        if cfg.eval_ood and run.ood_before is None:
            run.ood_before = ev(cfg.eval_ood, cfg.eval_split, f"ppl before ({cfg.eval_ood})", fresh=True)

        # 3. the method, its optimizer and LR schedule; resume, or prune one-shot methods here
        train_model = launch.wrap(model, cfg.fsdp, world, device)  # FSDP2 shards before the optimizer
        method = methods.make(cfg)
        opt = method.optimizer(cfg, model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        if resuming:
            blob = checkpoint.load_training_state(ckpt)
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
            set_rng_state(blob["rng"])
        elif method.before_training(model, opt, batches.calibration):  # then the mask stays fixed
            run.ppl_pruned = ev(cfg.dataset, cfg.eval_split, "ppl pruned")

        # 4. the training loop (fp16 autocast, on a GPU without bf16 units, scales the loss so
        # small gradients do not flush to 0; the scaler skips a step whose gradients overflowed)
        half = precision.amp_dtype(cfg.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.bf16 and half == torch.float16)
        model.train()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size * world
        bar = tqdm(range(run.step, cfg.steps), desc=f"fine-tune ({cfg.method}{f', {world} processes' if world > 1 else ''})",
                   initial=run.step, total=cfg.steps, disable=not show)
        for step in bar:
            t0 = time.perf_counter()
            for micro in range(cfg.grad_accum):
                x = batches(step, micro)
                with precision.autocast(device, cfg.bf16, cfg.bf16_matmul, half):  # emulated products if no bf16 unit
                    loss = loss_fn(train_model, x) if loss_fn else train_model(x, labels=x).loss
                scaler.scale(loss / cfg.grad_accum).backward()
                opt.record_loss(loss)  # E_t: the mean of the micro-batch losses, over ranks (§0, §6)
            lr = sched.get_last_lr()[0]
            scaler.step(opt)  # opt.step() (unscaled gradients first, when scaling)
            scaler.update()
            sched.step()
            method.after_step(step + 1, opt)  # before zero_grad: PLATON's score reads the step's gradient
            opt.zero_grad()
            rep = opt.sparsity_report()
            run.record(step + 1, opt.last_loss, rep, lr, method.scheduled(step + 1, rep), tokens_per_step, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{opt.last_loss:.3f}", R=f"{rep['scheduled_sparsity']:.3f}",
                            sparsity=f"{rep['sparsity_prunable']:.3f}", tok_s=f"{run.history[-1]['tokens_per_s']:.0f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_run(cfg, run, model, tok, opt, sched, world)

        # 5. perplexity after, checkpoint, report
        after = ev.after()
        ckpt = save_run(cfg, run, model, tok, opt, sched, world)
        report = build_report(cfg, run, opt.sparsity_report(), after, tokens_per_step,
                              opt.backend.__name__.rsplit(".", 1)[-1], ckpt, device, loss_fn)
        report["export"] = export_run(cfg, ckpt) if rank == 0 else None
        if rank == 0:
            write_report(report, cfg.out)
        return report
    finally:
        launch.teardown(started)


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
        *([f"distilled from {c['teacher'] or 'start'} (the model before pruning if 'start'): loss = "
           f"{c['distill_ce']:g}·CE + {c['distill_kl']:g}·T²·KL (T={c['distill_temperature']:g}) + "
           f"{c['distill_hidden']:g}·SquareHead"] if (c := report["config"])["distill_kl"] or c["distill_hidden"] else []),
        f"trained {report['train_tokens']:,} tokens in {report['train_seconds']:.0f} s "
        f"({report['tokens_per_s']:.0f} tokens/s, backend {report['backend']})",
        f"report: {os.path.join(report['config']['out'], 'report.md')} (+ report.json, *.png); "
        f"checkpoint: {report['checkpoint']}",
        *([f"export: {report['export']['path']} ({report['export']['dtype']}, {report['export']['bytes']:,} bytes, "
           f"{report['export']['ratio']:.2f}x the checkpoint's {report['export']['checkpoint_bytes']:,})"]
          if report.get("export") else []),
    ])
