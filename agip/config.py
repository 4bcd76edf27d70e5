"""The optimizer's settings: one validated, frozen :class:`Config`, and the presets
(docs/algorithm.md §5).

``AGIP(...)`` and ``TAAdamW(...)`` take their options as keyword arguments and build a
``Config`` here, which checks every value at once (before any buffer is allocated).
Per-group settings (lr, betas, eps, weight_decay) stay in torch's ``param_groups`` and are
checked by :func:`check_group`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from . import nm
from .schedule import SHAPES

SALIENCIES = ("taylor", "fisher")
FISHER_MOMENTS = ("current", "previous")  # v_t (with this step's gradient) or v_(t-1), algorithm.md §2.1b
FISHER_POWERS = {0.0: 0, 0.25: 1, 0.5: 2, 1.0: 4}  # p -> q = 4p: v_t^p with square roots only
NM_MODES = ("fixed", "decay")  # N:M: pruned groups stay pruned, or masks change while pruned weights decay (§2.5b)
COMPENSATIONS = ("none", "obs")  # "obs": the kept weights of a row take the OBS update when entries are cut (§2.6)


@dataclass(frozen=True)
class Preset:
    """The settings a preset decides (``options``; explicit arguments win) and the learning
    rate the harness uses with it (the optimizer's own ``lr`` default stays 5e-5)."""

    options: dict
    harness_lr: float


# "thesis": the thesis' method exactly. "default": the product default, chosen on validation
# data (docs/study.md: four candidates at 50% sparsity, 100 steps of SmolLM2-135M,
# by in-domain and out-of-domain validation perplexity): the Fisher score of algorithm.md
# §2.1b with p = 1/4 on a cubic ramp, a pruning step every step, no TA; the harness' lr is
# the one chosen for dense fine-tuning on the validation split.
PRESETS = {
    "thesis": Preset(dict(saliency="taylor", fisher_power=0.5, fisher_moment="current", schedule="exp",
                          prune_interval=1, ta_gamma=1.0, stability=True), harness_lr=5e-5),
    "default": Preset(dict(saliency="fisher", fisher_power=0.25, fisher_moment="previous", schedule="cubic",
                           prune_interval=1, ta_gamma=0.0, stability=False), harness_lr=1e-4),
}


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class Config:
    """Every setting of one optimizer beyond the per-group ones (docs/algorithm.md §5); the
    defaults are the ``"default"`` preset's. Build it with :meth:`resolve`."""

    max_grad_norm: Optional[float] = 1.0
    ta_gamma: float = 0.0
    ta_beta: float = 0.5
    ta_k: float = 1.0
    ta_clip: float = 1.0
    ta_eps: float = 1e-8
    ta_loss_floor: float = 0.0
    target_sparsity: float = 0.3
    schedule: str = "cubic"
    total_steps: Optional[int] = None
    warmup_steps: Optional[int] = None
    ramp_end: float = 0.75  # the cubic ramp reaches the target at ramp_end * total_steps
    tau: Optional[float] = None
    prune_interval: int = 1
    regrow_fraction: float = 0.0
    saliency_ema: float = 0.0
    stability: bool = False
    stability_window: int = 50
    saliency: str = "fisher"
    fisher_power: float = 0.25
    fisher_moment: str = "previous"
    preset: str = "default"
    sparsity_pattern: str = "unstructured"
    nm_mode: str = "fixed"
    nm_decay: float = 0.1
    nm_input_power: float = 0.0  # N:M: scores times ||X_j||^q, the input's norm (§2.5c); 0 = off
    compensate: str = "none"  # "obs": OBS update of the kept weights when a step cuts entries (§2.6); N:M

    @classmethod
    def resolve(cls, preset: str = "default", **options) -> "Config":
        """The config of ``preset`` with ``options`` applied: an option left as None takes
        the preset's value. Raises ValueError naming the first bad value."""
        need(preset in PRESETS, f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        need(not unknown, f"unknown option(s) {unknown}")
        chosen = {k: (PRESETS[preset].options[k] if v is None and k in PRESETS[preset].options else v)
                  for k, v in options.items()}
        return cls(preset=preset, **chosen)

    def __post_init__(self):
        need(self.saliency in SALIENCIES, f"saliency must be one of {SALIENCIES}, got {self.saliency!r}")
        need(number(self.fisher_power) and float(self.fisher_power) in FISHER_POWERS,
             f"fisher_power must be one of {sorted(FISHER_POWERS)} (v_t^p is computed with square roots "
             f"so that every backend rounds alike), got {self.fisher_power!r}")
        need(self.fisher_moment in FISHER_MOMENTS,
             f"fisher_moment must be one of {FISHER_MOMENTS}, got {self.fisher_moment!r}")
        need(self.max_grad_norm is None or (number(self.max_grad_norm) and self.max_grad_norm > 0),
             f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        need(number(self.ta_gamma) and self.ta_gamma >= 0, f"ta_gamma must be >= 0 (0 disables TA), got {self.ta_gamma!r}")
        need(number(self.ta_beta) and 0 < self.ta_beta < 1, f"ta_beta must be in (0, 1), got {self.ta_beta!r}")
        need(number(self.ta_k) and self.ta_k > 0, f"ta_k must be > 0, got {self.ta_k!r}")
        need(number(self.ta_clip) and self.ta_clip > 0, f"ta_clip must be > 0, got {self.ta_clip!r}")
        need(number(self.ta_eps) and self.ta_eps > 0, f"ta_eps must be > 0, got {self.ta_eps!r}")
        need(number(self.ta_loss_floor) and self.ta_loss_floor >= 0,
             f"ta_loss_floor must be >= 0, got {self.ta_loss_floor!r}")
        need(number(self.target_sparsity) and 0 <= self.target_sparsity < 1,
             f"target_sparsity must be in [0, 1), got {self.target_sparsity!r}")
        need(self.schedule in SHAPES, f"schedule must be one of {SHAPES}, got {self.schedule!r}")
        need(number(self.regrow_fraction) and 0 <= self.regrow_fraction <= 1,
             f"regrow_fraction must be in [0, 1], got {self.regrow_fraction!r}")
        need(number(self.saliency_ema) and 0 <= self.saliency_ema < 1,
             f"saliency_ema must be in [0, 1), got {self.saliency_ema!r}")
        pattern = nm.parse(self.sparsity_pattern)
        if pattern:
            n, m = pattern
            need(self.target_sparsity <= n / m + 1e-12,
                 f"sparsity_pattern {self.sparsity_pattern!r} prunes at most {n}/{m} = {n / m:g} of the prunable "
                 f"weights (all groups); got target_sparsity={self.target_sparsity!r}")
            need(self.regrow_fraction == 0,
                 "regrowth (regrow_fraction > 0) is for sparsity_pattern='unstructured' only")
        need(self.nm_mode in NM_MODES, f"nm_mode must be one of {NM_MODES}, got {self.nm_mode!r}")
        need(self.nm_mode == "fixed" or pattern is not None,
             f"nm_mode={self.nm_mode!r} is for an N:M sparsity_pattern (e.g. '2:4'); unstructured masks change "
             "through regrow_fraction")
        need(number(self.ramp_end) and 0 < self.ramp_end <= 1,
             f"ramp_end must be in (0, 1] (the share of total_steps where the cubic ramp ends), got {self.ramp_end!r}")
        need(number(self.nm_decay) and 0 < self.nm_decay <= 1, f"nm_decay must be in (0, 1], got {self.nm_decay!r}")
        need(number(self.nm_input_power) and 0 <= self.nm_input_power <= 1,
             f"nm_input_power must be in [0, 1] (0: off), got {self.nm_input_power!r}")
        need(self.nm_input_power == 0 or pattern is not None,
             f"nm_input_power={self.nm_input_power!r} is for an N:M sparsity_pattern (e.g. '2:4')")
        need(self.compensate in COMPENSATIONS, f"compensate must be one of {COMPENSATIONS}, got {self.compensate!r}")
        need(self.compensate == "none" or pattern is not None,
             "compensate='obs' is for an N:M sparsity_pattern (e.g. '2:4') in this version: an unstructured step "
             "applies its mask inside the fused update, before a host-side OBS update could see the cut weights")
        # stored as the state dict records them (a resumed run compares them)
        for name in ("ta_gamma", "ta_beta", "ta_k", "ta_clip", "ta_eps", "ta_loss_floor", "target_sparsity",
                     "regrow_fraction", "saliency_ema", "fisher_power", "nm_decay", "ramp_end", "nm_input_power"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "stability", bool(self.stability))

    @property
    def nm(self):
        """(N, M) of an N:M pattern, or None (unstructured)."""
        return nm.parse(self.sparsity_pattern)

    @property
    def fisher_q(self) -> int:
        """The kernels' score code: -1 is Taylor, q >= 0 Fisher |w| v_t^(q/4) (algorithm.md §2.1b)."""
        return FISHER_POWERS[self.fisher_power] if self.saliency == "fisher" else -1

    @property
    def scores_ahead(self) -> bool:
        """The score is the Fisher score of v_(t-1) without an EMA: the values the previous
        update wrote determine it, so that update can histogram it (docs/design.md "Scores ahead")."""
        return self.fisher_q >= 0 and self.fisher_moment == "previous" and self.saliency_ema == 0

    def needs_loss(self) -> bool:
        """Whether a step needs E_t: the TA term, or the stability factor of a pruning run."""
        return self.ta_gamma > 0 or (self.stability and self.target_sparsity > 0)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_group(group: dict, index: Optional[int] = None) -> None:
    """One param group's per-group settings (torch's keys plus AGIP's ``prune``); without
    ``index``, the optimizer's defaults for them."""
    where = "" if index is None else f" (param group {index})"
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    need(number(lr) and lr >= 0, f"lr must be a number >= 0{where}, got {lr!r}")
    need(isinstance(betas, (tuple, list)) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas),
         f"betas must be two numbers in [0, 1){where}, got {betas!r}")
    need(number(eps) and eps >= 0, f"eps must be a number >= 0{where}, got {eps!r}")
    need(number(wd) and wd >= 0, f"weight_decay must be a number >= 0{where}, got {wd!r}")
    need(isinstance(group["prune"], bool), f"'prune' must be True or False{where}, got {group['prune']!r}")
