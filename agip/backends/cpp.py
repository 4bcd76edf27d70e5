"""C++ backend for CPU tensors: ``csrc/agip_cpu.cpp`` (vectorized loops, ``at::parallel_for``),
driven by :class:`agip.backends.fused.FusedDriver`.

Built on first use with ``torch.utils.cpp_extension.load`` and ninja into a cache folder
(``$AGIP_CACHE_DIR`` or ``~/.cache/agip``), rebuilt when the source or the flags change;
``python -m agip.backends.cpp`` builds it ahead of time. If the build fails, importing
this module raises ImportError naming the cause, and ``backend="auto"`` falls back to
``reference`` with one warning.
"""
from __future__ import annotations

from importlib import resources

import torch

from . import cache_dir
from .fused import FusedDriver, keyword_update

FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension and return the module."""
    from torch.utils import cpp_extension

    source = str(resources.files("agip.csrc").joinpath("agip_cpu.cpp"))
    try:
        return cpp_extension.load(
            name="agip_cpu", sources=[source], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
            build_directory=cache_dir("cpp"), verbose=verbose,
        )
    except Exception as e:  # no compiler, no ninja, headers missing...
        msg = str(e).strip().splitlines()
        raise ImportError(
            f"could not build the C++ backend ({type(e).__name__}: {msg[-1] if msg else e}); "
            "it needs a C++ compiler and ninja (pip install ninja)"
        ) from e


_ext = build()


def check_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors; these parameters are on {device}: use backend='auto'")


_driver = FusedDriver("cpp", stats=_ext.stats, refine=_ext.refine, update=keyword_update(_ext.update))
grad_sumsq, select, update = _driver.grad_sumsq, _driver.select, _driver.update

if __name__ == "__main__":
    print(f"AGIP C++ backend built in {cache_dir('cpp')}")
