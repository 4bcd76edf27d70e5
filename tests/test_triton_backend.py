"""What only the Triton backend has (the cases every fused backend shares, run here in
triton's interpreter without a GPU, are in test_backends.py)."""
import pytest
import torch

triton_backend = pytest.importorskip("agip.backends.triton", reason="triton is not installed")


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_backend.check_device(torch.device("cpu"))
