"""CUDA backend: ``csrc/agip_cuda.cu`` (plain CUDA kernels, ``extern "C"`` launchers)
bound by ``csrc/agip_cuda.cpp``, driven by :class:`agip.backends.fused.FusedDriver`.
fp32 buffers only.

Built on first use with ``torch.utils.cpp_extension.load`` (nvcc + ninja) into
``$AGIP_CACHE_DIR`` (default ``~/.cache/agip``); needs a CUDA build of torch, whose
headers the binding includes. Importing this module raises ImportError naming the cause
when that is missing or the build fails.
"""
from __future__ import annotations

from importlib import resources

import torch

from . import cache_dir
from .fused import FusedDriver, keyword_update

if torch.version.cuda is None:
    raise ImportError(
        f"the cuda backend needs a CUDA build of torch (this is {torch.__version__}); "
        "use backend='triton', 'cpp' or 'reference'"
    )


def build(verbose: bool = False):
    from torch.utils import cpp_extension

    src = resources.files("agip.csrc")
    try:
        return cpp_extension.load(
            name="agip_cuda", sources=[str(src.joinpath("agip_cuda.cpp")), str(src.joinpath("agip_cuda.cu"))],
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--fmad=false"],
            build_directory=cache_dir("cuda"), verbose=verbose,
        )
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ImportError(f"could not build the CUDA backend ({type(e).__name__}: {msg[-1] if msg else e})") from e


_ext = build()


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors; these parameters are on {device}: use backend='auto'")


_driver = FusedDriver("cuda", stats=_ext.stats, refine=_ext.refine, update=keyword_update(_ext.update))
grad_sumsq, select, update = _driver.grad_sumsq, _driver.select, _driver.update
