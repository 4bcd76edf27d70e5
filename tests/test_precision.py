"""bf16 autocast with emulated products (agip/precision.py) against native bf16 autocast.

Native bf16 products are slow on a CPU without bf16 units but correct, so at these small
sizes they are the reference: the emulation must give the same dtypes and the same values
up to the order of fp32 sums (a rounding flip of one bf16 step in a few entries)."""
import pytest
import torch
import torch.nn.functional as F

from agip import precision
from agip.train import FinetuneConfig
from conftest import TinyLM, batch

BF16_STEP = 2.0 ** -7  # a bf16 value's spacing, relative: 8 bits of significand


def bf16_valued(t):
    return torch.equal(t, t.bfloat16().to(t.dtype))


def close_in_bf16(a, b, flips=0.01):
    """Equal, but for at most ``flips`` of the entries, each at most one bf16 step apart."""
    a, b = a.float(), b.float()
    off = a != b
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
    assert ((a - b).abs() <= 2 * BF16_STEP * scale)[off].all(), "an entry is more than one bf16 step off"
    assert off.float().mean() <= flips, f"{off.float().mean():.2%} of the entries differ"


def linear_step(matmul, x, w):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with precision.autocast("cpu", True, matmul):
        y = F.linear(x, w)
        loss = (y.float() ** 2).mean()
    loss.backward()
    return y, x.grad, w.grad


def test_linear_forward_and_backward_match_native_bf16():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 96, generator=g), torch.randn(80, 96, generator=g)
    native, emulated = linear_step("native", x, w), linear_step("emulated", x, w)
    for n, e in zip(native, emulated):
        assert n.dtype == e.dtype
        close_in_bf16(n, e)
    y, gx, gw = emulated
    assert y.dtype == torch.bfloat16  # autocast's output dtype, not fp32
    assert bf16_valued(gx) and bf16_valued(gw)  # the gradients went through bf16, as native ones do
    assert not torch.equal(y.float(), F.linear(x, w))  # the operands were rounded: not plain fp32


def test_tiny_model_loss_and_gradients_match_native_bf16():
    def step(matmul):
        model = TinyLM(d=32, seed=1)
        with precision.autocast("cpu", True, matmul):
            loss = model(batch(0))
        loss.backward()
        return loss, [p.grad for p in model.parameters()]

    (ln, gn), (le, ge) = step("native"), step("emulated")
    assert abs(ln.item() - le.item()) <= 1e-2 * abs(ln.item())
    for a, b in zip(gn, ge):
        torch.testing.assert_close(b, a, rtol=0.05, atol=1e-3)


def test_bf16_weights_are_emulated_too_and_other_calls_pass_through():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(16, 24, generator=g).bfloat16(), torch.randn(8, 24, generator=g).bfloat16()
    with precision.EmulatedBF16Products():  # a bf16 teacher, no autocast
        y = F.linear(x, w)
        assert y.dtype == torch.bfloat16
        close_in_bf16(y, F.linear(x.float(), w.float()).bfloat16())
        a, b = torch.randn(5, 7, generator=g), torch.randn(7, 3, generator=g)
        assert torch.equal(a @ b, torch.mm(a, b)) and (a @ b).dtype == torch.float32  # fp32, no autocast: untouched


def test_modes_are_checked():
    assert precision.resolve("native", "cpu") == "native"
    assert precision.resolve("auto", "cpu") == ("native" if precision.native_bf16_matmul("cpu") else "emulated")
    assert precision.resolve("auto", "cuda") == "native"
    with pytest.raises(ValueError, match="must be one of"):
        precision.resolve("fast", "cpu")
    with pytest.raises(ValueError, match="for CPUs"):
        precision.resolve("emulated", "cuda")
    with pytest.raises(ValueError, match="--bf16-matmul"):
        FinetuneConfig(bf16_matmul="fast").check()


def test_the_mode_around_torch_autocast_is_the_harness_autocast():
    """What the README gives Trainer users (the mode around another library's autocast)
    computes what ``precision.autocast(..., "emulated")`` does, bit for bit."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(12, 20, generator=g), torch.randn(6, 20, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16), precision.EmulatedBF16Products():
        a = F.linear(x, w)
    with precision.autocast("cpu", True, "emulated"):
        b = F.linear(x, w)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
