"""bf16 autocast, with the matrix products emulated where the CPU has no bf16 unit.

On a CPU without bf16 matrix instructions (AVX2, or AVX-512 without ``avx512_bf16``/AMX)
oneDNN does not take bf16 products and torch falls back to a scalar loop: a training step
of the embedded model takes minutes instead of seconds. The emulation computes each such
product the way a bf16 unit does, at fp32 speed: the operands rounded to bf16 (what
autocast's cast does), multiplied and summed in fp32 (what a bf16 unit does: a product of
two bf16 values is exact in fp32, and oneDNN accumulates in fp32), the result rounded to bf16
(autocast's output dtype). Backward follows from autograd: the gradient reaching each
operand is rounded to bf16 by the cast's backward, as a bf16 product's gradient would be.
What can differ from a native bf16 unit is only the order of the fp32 sums, the way two
CPUs with bf16 units already differ (see docs/study.md: about one seed's
standard deviation in a run's perplexity).

Everything else stays under the real ``torch.autocast`` (its fp32 ops, elementwise ops in
bf16, attention); only the products below are intercepted, and only where autocast would
run them in bf16 or their floating inputs are bf16 already (a bf16 teacher).
"""
import contextlib
import os
import platform

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

MODES = ("auto", "native", "emulated")
AMPS = ("auto", "bf16", "fp16")  # the autocast dtype: auto = bf16, fp16 on a CUDA GPU without bf16 units
# the products autocast runs in bf16 on CPU that a transformer calls (attention is left
# native: its bf16 kernel is fast without a bf16 unit, it converts to fp32 inside)
PRODUCTS = frozenset({F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                      torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm})


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (CUDA, or a CPU whose oneDNN
    takes bf16: AVX-512 with bf16, AMX)."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cuda_bf16() -> bool:
    """Whether the current CUDA device (the one each process trains on) has bf16 units (sm_80
    and newer). A T4 (sm_75) has none: torch then runs bf16 by emulation, correct but slow, so
    ``amp_dtype("auto")`` takes fp16 there."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``amp`` (one of ``AMPS``) on ``device``: ``"auto"`` is bf16, except
    fp16 on a CUDA GPU without bf16 units, where training then needs a gradient scaler (the
    harness uses ``torch.amp.GradScaler``). ``"fp16"`` is also offered on the CPU (where torch's
    autocast takes it), mainly so that path can be tested without a GPU."""
    if amp not in AMPS:
        raise ValueError(f"--amp must be one of {AMPS}, got {amp!r}")
    device = torch.device(device)
    if amp == "fp16" or (amp == "auto" and device.type == "cuda" and not cuda_bf16()):
        return torch.float16
    return torch.bfloat16


def cpu_name() -> str:
    """This machine's CPU, as results record it (model name, torch's vector level, and whether
    oneDNN takes bf16 products): bf16 rounds differently across CPUs."""
    model = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    units = "bf16 units" if native_bf16_matmul("cpu") else "no bf16 units"
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {units})"


def resolve(mode: str, device: torch.device) -> str:
    """``"native"`` or ``"emulated"`` for ``mode`` (one of ``MODES``) on ``device``:
    ``"auto"`` emulates only on a CPU without bf16 products."""
    if mode not in MODES:
        raise ValueError(f"bf16 matmul mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    if mode == "emulated" and device.type != "cpu":
        raise ValueError(f"bf16 matmul emulation is for CPUs; {device} multiplies bf16 natively: use 'auto' or 'native'")
    if mode == "auto":
        return "native" if native_bf16_matmul(device) else "emulated"
    return mode


class EmulatedBF16Products(TorchFunctionMode):
    """Runs the matrix products of ``PRODUCTS`` as fp32 products of bf16-rounded operands,
    rounded to bf16 (module docstring), where autocast (CPU) is on or every floating
    operand is bf16; other calls pass through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        floats = [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]
        autocast = torch.is_autocast_enabled("cpu")
        if not floats or any(t.device.type != "cpu" for t in floats) or not (
                all(t.dtype == torch.bfloat16 for t in floats)
                or autocast and all(t.dtype in (torch.float32, torch.bfloat16) for t in floats)):
            return func(*args, **kwargs)
        # round to bf16 first (autocast's cast), then compute in fp32 (the bf16 unit's sums)
        flat = [t.to(torch.bfloat16).float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t in flat]
        a, k = tree_unflatten(flat, spec)
        with torch.autocast("cpu", enabled=False):
            return func(*a, **k).to(torch.bfloat16)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True, matmul: str = "auto", dtype: torch.dtype = torch.bfloat16):
    """``torch.autocast(device, dtype)``; in bf16 with the matrix products emulated
    (``EmulatedBF16Products``) when ``matmul`` resolves to ``"emulated"`` (``resolve``).
    Disabled: nothing changes."""
    device = torch.device(device)
    mode = resolve(matmul, device) if enabled and dtype == torch.bfloat16 else "native"
    with torch.autocast(device.type, dtype=dtype, enabled=enabled):
        with EmulatedBF16Products() if mode == "emulated" else contextlib.nullcontext():
            yield
