"""The Triton backend against the reference (issue 3, must show 1). Without a GPU the
kernels run in triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)."""
import math

import pytest
import torch

from agip.backends import reference
from backend_cases import LAYOUTS, make_flat, make_plan, run_backend, ulps

triton_backend = pytest.importorskip("agip.backends.triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# w, m, v tolerance, in fp32 ulps of the operands (backend_cases.ulps): both backends
# evaluate the same fp32 formulas, but torch's CPU kernels use fused multiply-adds (lerp,
# addcmul) where the kernel rounds each product, so m and v may differ by 1 ulp; w sums
# three terms (decay, Adam step, TA step), each carrying up to 1 ulp: <= 3 ulps. Seen
# over 50 random states: w 2.9, m 1.0, v 1.0.
MAX_ULPS = 4


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # many programs per launch on small buffers, and partial last blocks
    monkeypatch.setattr(triton_backend, "block", 64)


CASES = [
    # layout, pruned fraction before, k fraction, regrowth, ema, pruning step
    ("odd", 0.3, 0.5, 0.0, 0.0, True),
    ("odd", 0.3, 0.5, 0.2, 0.0, True),
    ("many", 0.0, 0.4, 0.0, 0.9, True),  # none pruned yet
    ("many", 0.2, 0.3, 0.5, 0.5, True),
    ("prunable_only", 1.0, 0.5, 0.3, 0.0, True),  # all pruned: regrowth decides
    ("prunable_only", 1.0, 0.0, 1.0, 0.0, True),  # all regrow, nothing to prune
    ("prunable_only", 0.0, 0.0, 0.0, 0.0, True),  # k = 0: keep every entry
    ("many", 0.2, 0.999, 0.0, 0.0, True),  # k = N - 1 or so
    ("odd", 0.3, 0.5, 0.0, 0.5, False),  # non-pruning step with an EMA
    ("dense_only", 0.0, 0.0, 0.0, 0.0, False),
]


@pytest.mark.parametrize("layout,pruned,k_frac,regrow,rho,prune", CASES)
def test_triton_matches_reference(layout, pruned, k_frac, regrow, rho, prune):
    ref, _ = make_flat(layout, pruned=pruned, ema=rho > 0)
    tri, _ = make_flat(layout, pruned=pruned, ema=rho > 0, device=DEVICE)
    plan = make_plan(ref, k_frac, regrow=regrow, ema_rho=rho, prune=prune)
    before = [{n: getattr(b, n).clone() for n in "wmv"} for b in ref.buckets]
    g2_ref, sel_ref = run_backend(reference, ref, plan)
    g2_tri, sel_tri = run_backend(triton_backend, tri, plan)
    assert g2_tri == pytest.approx(g2_ref, rel=1e-6)
    if prune:
        assert sel_tri == sel_ref  # theta, regrowth threshold and count: bit-identical
    for rb, tb, old in zip(ref.buckets, tri.buckets, before):
        assert torch.equal(rb.mask, tb.mask.cpu())
        if rb.ema is not None:
            assert torch.equal(rb.ema, tb.ema.cpu())
        for name in ("w", "m", "v"):
            a, b = getattr(rb, name), getattr(tb, name).cpu()
            assert ulps(a, b, old[name]) <= MAX_ULPS, name
            assert torch.equal(a == 0, b == 0), f"{name}: zeros differ"
    if prune and plan.k > 0:
        assert sum(int((~b.mask).sum()) for b in ref.buckets) >= plan.k


def test_two_runs_are_identical():
    results = []
    for _ in range(2):
        flat, _ = make_flat("many", pruned=0.2, ema=True, device=DEVICE)
        plan = make_plan(flat, 0.4, regrow=0.3, ema_rho=0.5)
        g2, sel = run_backend(triton_backend, flat, plan)
        results.append((g2, sel, [torch.cat([b.w, b.m, b.v]).cpu() for b in flat.buckets]))
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_non_finite_gradient_on_a_pruned_entry_makes_g2_non_finite():
    flat, _ = make_flat("odd", pruned=0.5, device=DEVICE)
    b = flat.buckets[0]
    i = int((~b.mask).nonzero()[0])
    b.g[i] = math.inf
    plan = make_plan(flat, 0.5)
    assert not math.isfinite(triton_backend.grad_sumsq(flat, plan))
    assert not math.isfinite(reference.grad_sumsq(flat, plan))


def test_optimizer_runs_on_triton_backend_like_reference():
    import agip
    from conftest import TinyLM, train

    models, opts, before = [], [], [p.detach().clone() for p in TinyLM().parameters()]
    for backend in ("reference", "triton"):
        model = TinyLM().to(DEVICE) if backend == "triton" else TinyLM()
        opt = agip.AGIP(agip.param_groups(model), lr=1e-2, target_sparsity=0.5, total_steps=6,
                        warmup_steps=1, regrow_fraction=0.1, backend=backend)
        models.append(model), opts.append(opt)
    train(models[0], opts[0], 1)
    if DEVICE == "cpu":
        train(models[1], opts[1], 1)
        for a, b, old in zip(models[0].parameters(), models[1].parameters(), before):
            assert ulps(a.detach(), b.detach(), old) <= MAX_ULPS
    assert opts[1].backend.__name__ == "agip.backends.triton"


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_backend.check_device(torch.device("cpu"))
