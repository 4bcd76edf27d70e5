"""CUDA backend: ``csrc/agip_cuda.cu`` (plain CUDA kernels, ``extern "C"`` launchers)
bound by ``csrc/agip_cuda.cpp``, driven by :class:`agip.backends.fused.FusedDriver`.
fp32 buffers only.

Built on first use with ``torch.utils.cpp_extension.load`` (nvcc + ninja) into
``$AGIP_CACHE_DIR`` (default ``~/.cache/agip``); needs a CUDA build of torch, whose
headers the binding includes. Importing this module raises ImportError naming the cause
when that is missing or the build fails.
"""
from __future__ import annotations

import torch

from . import load_extension
from .fused import FusedDriver

if torch.version.cuda is None:
    raise ImportError(
        f"the cuda backend needs a CUDA build of torch (this is {torch.__version__}); "
        "use backend='triton', 'cpp' or 'reference'"
    )


def build(verbose: bool = False):
    return load_extension("cuda", "agip_cuda", ["agip_cuda.cpp", "agip_cuda.cu"], extra_cflags=["-O3"],
                          extra_cuda_cflags=["-O3", "--fmad=false"], verbose=verbose)


_ext = build()


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors; these parameters are on {device}: use backend='auto'")


_driver = FusedDriver.for_extension("cuda", _ext)
grad_sumsq, select, update = _driver.grad_sumsq, _driver.select, _driver.update
