"""bf16 autocast with emulated products (agip/precision.py) against native bf16 autocast.

Native bf16 products are slow on a CPU without bf16 units but correct, so at these small
sizes they are the reference: the emulation must give the same dtypes and the same values
up to the order of fp32 sums (a rounding flip of one bf16 step in a few entries)."""
import math

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


def test_a_cuda_gpu_without_bf16_units_trains_in_fp16(monkeypatch):
    """A T4 (sm_75) has no bf16 units: torch would run bf16 emulated, slowly. Faked here:
    ``auto`` takes fp16 there and bf16 on a GPU that has them; the CPU keeps bf16."""
    asked = []

    def fake(including_emulation=True, units=False):
        asked.append(including_emulation)
        return units or including_emulation  # a T4: bf16 "supported" only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)
    assert precision.amp_dtype("auto", "cuda") == torch.float16 and asked == [False]
    assert precision.amp_dtype("bf16", "cuda") == torch.bfloat16  # asked for: kept
    assert precision.amp_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert precision.amp_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="--amp must be one of"):
        precision.amp_dtype("fp8", "cuda")
    with pytest.raises(ValueError, match="--amp must be one of"):
        FinetuneConfig(amp="fp8").check()
    with pytest.raises(ValueError, match="gradient scaler"):
        FinetuneConfig(amp="fp16", fsdp=True).check()


def test_fp16_autocast_trains_with_a_gradient_scaler(gpt2_dir, corpus_dir, tmp_path, monkeypatch):
    """The fp16 path of the harness (what a T4 runs), on the CPU: fp16 autocast, the loss
    scaled by torch.amp.GradScaler, AGIP stepping on unscaled gradients; reported as fp16."""
    pytest.importorskip("transformers")
    from agip.train import finetune

    scaled = []
    real_scale = torch.amp.GradScaler.scale

    def spy(self, outputs):
        out = real_scale(self, outputs)
        scaled.append(float(out.detach()) / float(outputs.detach()))
        return out

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy)
    cfg = FinetuneConfig(model=gpt2_dir, dataset=corpus_dir, out=str(tmp_path / "run"), steps=4, batch_size=2,
                         block_size=32, lr=1e-3, target_sparsity=0.5, eval_seq_len=64, eval_max_tokens=None,
                         progress=False, amp="fp16")
    report = finetune(cfg)
    assert report["autocast"] == "fp16" and report["bf16_products"] is None
    assert len(scaled) == 4 and all(s > 1 for s in scaled)  # the loss was scaled (65536 at first)
    assert report["sparsity_prunable"] == pytest.approx(0.5, abs=1e-4)
    assert all(math.isfinite(h["loss"]) for h in report["history"]) and math.isfinite(report["ppl_after"]["ppl"])
    assert "with a gradient scaler" in (tmp_path / "run" / "report.md").read_text()
    bf16 = finetune(FinetuneConfig(**{**cfg.__dict__, "out": str(tmp_path / "bf16"), "amp": "auto"}))
    assert bf16["autocast"] == "bf16" and scaled[4:] == [1.0] * 4  # bf16 needs no scaler: the loss is not scaled
