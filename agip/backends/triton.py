"""Triton backend: the AGIP step as three fused kernels per flat bucket (``agip.kernels``),
driven by :class:`agip.backends.fused.FusedDriver`.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (for tests).
"""
from __future__ import annotations

import os

import torch

from . import source_dir
from .fused import FusedDriver, Kernels

def _own_kernels() -> None:
    """Register ``agip.kernels`` as the package of this agip's own ``kernels`` folder
    (agip.backends.source_dir), not the checkout an editable install maps it to. The folder
    has no ``__init__.py`` (so it never shadows the PyPI package ``kernels``): the package is
    made here, with that folder as its only search location."""
    import importlib.machinery
    import importlib.util
    import sys

    if "agip.kernels" in sys.modules:
        return
    folder = str(source_dir("kernels"))
    spec = importlib.machinery.ModuleSpec("agip.kernels", None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "AGIP's Triton kernels, one file per fused op (see agip.kernels.common)."
    sys.modules["agip.kernels"] = module


try:
    _own_kernels()
    from agip.kernels import common as kernels
    from agip.kernels.refine import refine as _refine
    from agip.kernels.stats import stats as _stats
    from agip.kernels.update import update as _update
except ImportError as e:  # triton missing or broken: say what to do
    raise ImportError(f"the triton backend needs triton ({e}); pip install triton, or use backend='reference'") from e

block = kernels.BLOCK  # elements per program; tests shrink it to run many programs on small buffers


def check_device(device: torch.device) -> None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"backend='triton' runs on CUDA tensors; these parameters are on {device}. "
        "Use backend='auto' (or 'reference'), or set TRITON_INTERPRET=1 before importing triton to "
        "run the kernels in the (slow) interpreter"
    )


_driver = FusedDriver("triton", Kernels(
    stats=lambda *a: _stats(*a, block=block),
    refine=lambda *a: _refine(*a, block=block),
    update=lambda *a: _update(*a, block=block),
))
grad_sumsq, select, update = _driver.grad_sumsq, _driver.select, _driver.update
