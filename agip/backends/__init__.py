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
within a few fp32 ulps. The fused backends' kernels take their scalars as the argument
bundles below (:class:`ScoreArgs`, :class:`UpdateArgs`), whose field order is the
kernels' and the order of the matching structs in ``csrc/agip_math.h`` (a test compares
them).

There is no separate CUDA C++ backend: ``triton`` runs the same passes on CUDA tensors,
and torch's Linux CUDA wheels install triton, so ``backend="auto"`` finds it wherever a GPU
is; a second GPU implementation (fp32 only, without the kept band, untestable in CI) did
not earn its upkeep and was removed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

BACKENDS = ("reference", "cpp", "triton")
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
    # Scores ahead (fisher_moment="previous"; docs/design.md "Scores ahead"): the update also
    # histograms the next step's score S_(t+1) = |w_t| v_t^p from the values it writes
    # (score_ahead), and this step's pass A may use what the previous update histogrammed
    # (ahead_valid: nothing has written w, v or a mask in place since that step).
    score_ahead: bool = False
    ahead_valid: bool = False
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

    @property
    def score_needs_clip(self) -> bool:
        """The score reads this step's clipped gradient (the Fisher score of v_t), so it is
        known only once G^2 is summed; Taylor and the Fisher score of v_(t-1) are not."""
        return self.fisher and not (self.fisher_beta2 == 1.0 and self.fisher_omb2 == 0.0)

    def score_args(self) -> tuple:
        """The score's scalars as the kernels take them (:class:`ScoreArgs`)."""
        return dataclasses.astuple(ScoreArgs(self.fisher_q, self.clip, self.fisher_beta2, self.fisher_omb2,
                                             self.ema_keep, self.ema_new))


@dataclass(frozen=True)
class ScoreArgs:
    """The score's scalars, in the order the stats and refine kernels take them (the numbers
    are ``ScoreArgs`` of csrc/agip_math.h): Taylor (``fisher_q = -1``) or Fisher
    ``|w| v_t^(q/4)`` with ``v_t = beta2 v + omb2 ghat^2``, then the EMA ``keep S̄ + new S``."""

    fisher_q: int
    clip: float
    beta2: float
    omb2: float
    ema_keep: float
    ema_new: float


@dataclass(frozen=True)
class UpdateArgs:
    """Pass C's scalars for one param group's range, in the update kernels' order (the
    numbers are ``UpdateArgs`` of csrc/agip_math.h; docs/algorithm.md §1.3-1.6)."""

    decay: float  # 1 - lr wd
    lerp_weight: float  # 1 - beta1
    beta2: float
    one_minus_beta2: float
    step_size: float  # -lr / (1 - beta1^t)
    bc2_sqrt: float  # sqrt(1 - beta2^t)
    eps: float
    clip: float
    neg_lr_s: float  # -lr s: the terminal attractor
    theta: float
    regrow_theta: float
    ema_keep: float
    ema_new: float
    score_beta2: float  # the score's v_t = score_beta2 v + score_omb2 ghat^2 (1, 0: v_(t-1))
    score_omb2: float
    prunable: bool  # the range lies in the prunable segment (reads the mask)
    prune_step: bool  # writes the new mask M' = (S > theta)
    fisher_q: int

    @classmethod
    def of(cls, plan: "StepPlan", h: GroupHyper, prunable: bool) -> "UpdateArgs":
        t = plan.step
        return cls(decay=1 - h.lr * h.weight_decay, lerp_weight=1 - h.beta1, beta2=h.beta2,
                   one_minus_beta2=1.0 - h.beta2, step_size=-h.lr / (1 - h.beta1**t),
                   bc2_sqrt=math.sqrt(1 - h.beta2**t), eps=h.eps, clip=plan.clip, neg_lr_s=-h.lr * plan.ta_scale,
                   theta=plan.theta, regrow_theta=plan.regrow_theta, ema_keep=plan.ema_keep, ema_new=plan.ema_new,
                   score_beta2=plan.fisher_beta2, score_omb2=plan.fisher_omb2, prunable=prunable,
                   prune_step=plan.prune, fisher_q=plan.fisher_q)

    def numbers(self) -> List[float]:
        """The floating-point fields, in order (what a C kernel reads into its struct)."""
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "float"]


@dataclass
class Selection:
    theta: float
    regrow_theta: float
    n_regrown: int


def available() -> List[str]:
    return list(BACKENDS)


def resolve(name: str, device: torch.device):
    """The backend module for ``name`` on ``device``.

    ``"auto"``: ``triton`` for CUDA tensors, ``cpp`` for CPU tensors,
    ``reference`` where none of those loads (with one warning per process saying why).
    """
    global _warned_fallback
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name == "auto":
        reasons = []
        for fast in {"cuda": ("triton",), "cpu": ("cpp",)}.get(device.type, ()):
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


# the C++ backend's build targets ($AGIP_CPU_TARGET): this CPU's own instructions, or the
# x86-64 levels of AVX2 (+ FMA, BMI2) and of AVX-512 (F, BW, VL, DQ, CD), so that an AVX-512
# machine can build and time the code an AVX2 laptop runs
CPU_TARGETS = {"native": "native", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}


def cpu_march() -> str:
    """The ``-march`` of the C++ backend: ``$AGIP_CPU_TARGET`` (one of ``CPU_TARGETS``;
    default ``native``)."""
    import os

    target = os.environ.get("AGIP_CPU_TARGET") or "native"
    if target not in CPU_TARGETS:
        raise ValueError(f"AGIP_CPU_TARGET must be one of {tuple(CPU_TARGETS)}, got {target!r}")
    return CPU_TARGETS[target]


def native_target(march: Optional[str] = None) -> str:
    """What ``-march=<march>`` (default :func:`cpu_march`) resolves to on this machine: the C++
    compiler's predefined macros under it (the instruction sets it enables), or the CPU's model
    and flags from ``/proc/cpuinfo`` where no compiler answers."""
    return _target_macros(march or cpu_march())


@functools.lru_cache(maxsize=None)
def _target_macros(march: str) -> str:
    import os
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return "\n".join(sorted(out.splitlines()))
    except (OSError, subprocess.SubprocessError):
        try:
            with open("/proc/cpuinfo") as f:
                return "".join(ln for ln in f if ln.startswith(("model name", "flags")))
        except OSError:
            import platform

            return platform.processor() or platform.machine()


def cache_dir(kind: str) -> str:
    """Where native extensions are built: ``$AGIP_CACHE_DIR`` or ``~/.cache/agip``, one
    folder per kind, torch version, Python version and, for ``cpp`` (built with
    ``-march=native``), what that resolves to on this CPU: a home folder shared by machines
    with different CPUs (a cluster's NFS home) never loads a build another CPU cannot run."""
    import os
    import sys

    root = os.environ.get("AGIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "agip")
    tag = f"{kind}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    if kind == "cpp":
        tag += "-cpu" + hashlib.sha256(native_target().encode()).hexdigest()[:12]
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    return path


def source_dir(name: str):
    """The folder of this agip's ``csrc`` (C++ sources) or ``kernels`` (Triton kernels): the
    installed subpackage ``agip/<name>``, or in a source checkout (``agip/`` beside ``<name>/``
    and ``setup.py``) that checkout's ``<name>/``. Never another checkout's: an editable install
    maps ``agip.csrc`` / ``agip.kernels`` to its own folders, so a second checkout or a git
    worktree imported from its root would otherwise compile and run the installed one's kernels."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1]
    if (package / name).is_dir():
        return package / name
    checkout = package.parent
    if (checkout / "setup.py").is_file() and (checkout / name).is_dir():
        return checkout / name
    raise FileNotFoundError(f"this agip ({package}) has no {name}/ folder beside it, nor a checkout's "
                            f"{checkout / name}: the install is incomplete; reinstall agip (pip install agip)")


STALE_LOCK_S = 1800  # a build takes minutes; a lock this old belongs to a build that was killed


def clear_stale_lock(build_dir: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's build lock in ``build_dir`` if it is older than ``max_age_s``: a build
    killed mid-way leaves it, and every later import would wait on it forever. Says so once."""
    import os
    import time

    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return False
    if age < max_age_s:
        return False
    os.remove(lock)
    warnings.warn(f"removed a build lock {age / 60:.0f} minutes old in {build_dir} (a build killed mid-way left it)")
    return True


def load_extension(kind: str, name: str, sources, headers=(), hint: str = "", **flags):
    """Compile ``csrc`` sources into an extension (or load the cached build) with
    ``torch.utils.cpp_extension.load`` and ninja, in :func:`cache_dir` ``(kind)``; rebuilt
    when a source, a header in ``headers`` or a flag changes. A failed build raises
    ImportError naming the cause (so ``backend="auto"`` can fall back with one warning)."""
    from torch.utils import cpp_extension

    src = source_dir("csrc")
    if headers:  # torch hashes the sources and flags to decide a rebuild: the headers go into a flag
        digest = hashlib.sha256(b"".join(src.joinpath(h).read_bytes() for h in headers)).hexdigest()[:16]
        flags["extra_cflags"] = [*flags.get("extra_cflags", []), f"-DAGIP_HEADERS_SHA={digest}"]
    build_dir = cache_dir(kind)
    clear_stale_lock(build_dir)
    try:
        return cpp_extension.load(name=name, sources=[str(src.joinpath(f)) for f in sources],
                                  build_directory=build_dir, **flags)
    except Exception as e:  # no compiler, no ninja, headers missing...
        msg = str(e).strip().splitlines()
        raise ImportError(f"could not build the {kind} backend ({type(e).__name__}: {msg[-1] if msg else e}){hint}") from e
