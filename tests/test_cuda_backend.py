"""CUDA sources (issue 4): every .cu compiles with nvcc for a T4 (sm_75) and for
H100/H200 (sm_90) wherever nvcc is installed; on a CUDA machine the `cuda` backend
matches the reference like the other fused backends."""
import os
import shutil
import subprocess

import pytest
import torch

from backend_cases import CASES, compare_over_steps, compare_with_reference

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
@pytest.mark.parametrize("cu", CU_FILES)
def test_cuda_source_compiles(cu, arch, tmp_path):
    res = subprocess.run(
        ["nvcc", "-c", f"-arch={arch}", "-O3", "--fmad=false", os.path.join(CSRC, cu), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr


def test_cuda_sources_have_no_torch_headers():
    for cu in CU_FILES:
        text = open(os.path.join(CSRC, cu)).read()
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_cuda_backend_is_refused_on_a_cpu_torch():
    from agip import backends

    with pytest.raises(ImportError, match="CUDA build of torch"):
        backends.resolve("cuda", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_reference(case):
    from agip.backends import cuda

    compare_with_reference(cuda, case, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_theta_window_across_steps():
    from agip.backends import cuda

    assert compare_over_steps(cuda, [0.2, 0.21, 0.22, 0.6, 0.61], device="cuda", regrow=0.2)[1] == 1
