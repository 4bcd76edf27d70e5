"""Backends: interchangeable implementations of the three passes of one AGIP step.

Like ``torch/optim/adamw.py``'s single-tensor / foreach / fused split, the optimizer
class owns the state and each backend module provides the same three functions over an
:class:`agip.flat.FlatState` (docs/design.md, "The way data flows"):

- ``grad_sumsq(flat, plan) -> float``: pass A, G^2 = sum of (g * M)^2 over prunable entries
  plus g^2 over the rest (docs/algorithm.md §1.2); non-finite when any gradient entry is. On pruning
  steps a fused backend also gathers what ``select`` needs in the same read.
- ``select(flat, plan) -> Selection``: on pruning steps, the exact regrowth threshold and
  the exact global saliency threshold theta (docs/algorithm.md §2.2, 2.3), from pre-update w and raw g.
- ``update(flat, plan)``: clip, AdamW, TA, the new mask and ``w, m, v * M'`` (docs/algorithm.md §1.3-1.6).

Every backend is tested against ``reference``: masks and theta bit-identical; w, m, v
within a few fp32 ulps.
"""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
_warned_fallback = False


@dataclass
class GroupHyper:
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float


@dataclass
class StepPlan:
    """Everything one step needs beyond the buffers: host-side scalars, decided up front."""

    step: int  # t, 1-based, after this step
    clip: float  # c (docs/algorithm.md §1.3)
    ta_scale: float  # s (docs/algorithm.md §1.5), already TA-clipped; 0 disables TA
    groups: List[GroupHyper] = field(default_factory=list)
    prune: bool = False  # a pruning step: compute M' (docs/algorithm.md §2)
    k: int = 0  # entries to prune: floor(R_t * N)
    regrow_fraction: float = 0.0  # phi
    # Saliency EMA S <- keep * S + new * |w g|, constants rounded to fp32 once here so
    # that every backend multiplies by the very same numbers (bit-identical masks).
    ema_keep: float = 0.0
    ema_new: float = 1.0
    # The score (algorithm.md §2.1, §2.1b): fisher_q = -1 is Taylor |w g|; q >= 0 is Fisher
    # |w| v_t^(q/4) with v_t = beta2 v + (1 - beta2) ghat^2, its constants rounded to fp32
    # once here (the shared beta2 of the prunable groups).
    fisher_q: int = -1
    fisher_beta2: float = 0.0
    fisher_omb2: float = 0.0
    theta: float = -1.0  # filled by select: M' = (S > theta); -1 keeps every entry
    regrow_theta: float = math.inf  # filled by select: regrow pruned entries with |g| > it

    @staticmethod
    def ema_constants(rho: float):
        return float(np.float32(rho)), float(np.float32(1.0 - rho))

    @staticmethod
    def fisher_constants(beta2: float):
        # as the update kernels round them: (float) beta2 and (float) (1 - beta2)
        return float(np.float32(beta2)), float(np.float32(1.0 - beta2))

    @property
    def fisher(self) -> bool:
        return self.fisher_q >= 0

    def score_args(self):
        """The score's scalars, in the kernels' argument order: fisher_q, clip, beta2, 1 - beta2."""
        return self.fisher_q, self.clip, self.fisher_beta2, self.fisher_omb2


@dataclass
class Selection:
    theta: float
    regrow_theta: float
    n_regrown: int


def available() -> List[str]:
    return list(BACKENDS)


def resolve(name: str, device: torch.device):
    """The backend module for ``name`` on ``device``.

    ``"auto"``: ``triton`` (then ``cuda``) for CUDA tensors, ``cpp`` for CPU tensors,
    ``reference`` where none of those loads (with one warning per process saying why).
    """
    global _warned_fallback
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name == "auto":
        reasons = []
        for fast in {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}.get(device.type, ()):
            try:
                return resolve(fast, device)
            except ImportError as e:
                reasons.append(str(e))
        if reasons and not _warned_fallback:
            warnings.warn(f"AGIP falls back to the reference backend: {'; '.join(reasons)}", stacklevel=3)
            _warned_fallback = True
        return importlib.import_module("agip.backends.reference")
    module = importlib.import_module(f"agip.backends.{name}")
    if hasattr(module, "check_device"):
        module.check_device(device)
    return module


def regrow_counts(n_pruned: int, regrow_fraction: float):
    """docs/algorithm.md §2.2: n_g = floor(phi * #pruned) regrow; the other #pruned - n_g stay pruned."""
    n_g = int(math.floor(regrow_fraction * n_pruned))
    return n_g, n_pruned - n_g


def cache_dir(kind: str) -> str:
    """Where native extensions are built: ``$AGIP_CACHE_DIR`` or ``~/.cache/agip``, one
    folder per kind, torch version and Python version (builds are not portable across)."""
    import os
    import sys

    root = os.environ.get("AGIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "agip")
    tag = f"{kind}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    return path


def load_extension(kind: str, name: str, sources, hint: str = "", **flags):
    """Compile ``csrc`` sources into an extension (or load the cached build) with
    ``torch.utils.cpp_extension.load`` and ninja, in :func:`cache_dir` ``(kind)``; rebuilt
    when a source or flag changes. A failed build raises ImportError naming the cause
    (so ``backend="auto"`` can fall back with one warning)."""
    from importlib import resources

    from torch.utils import cpp_extension

    src = resources.files("agip.csrc")
    try:
        return cpp_extension.load(name=name, sources=[str(src.joinpath(f)) for f in sources],
                                  build_directory=cache_dir(kind), **flags)
    except Exception as e:  # no compiler, no ninja, headers missing...
        msg = str(e).strip().splitlines()
        raise ImportError(f"could not build the {kind} backend ({type(e).__name__}: {msg[-1] if msg else e}){hint}") from e
