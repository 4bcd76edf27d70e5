"""The Triton backend against the reference (issue 3, must show 1). Without a GPU the
kernels run in triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)."""
import math

import pytest
import torch

from agip.backends import reference
from backend_cases import HYPERS, CASES, SCORES, compare_over_steps, compare_with_reference, make_flat, make_plan, run_backend

triton_backend = pytest.importorskip("agip.backends.triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # many programs per launch on small buffers, and partial last blocks
    monkeypatch.setattr(triton_backend, "block", 64)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fisher_q", SCORES)
def test_triton_matches_reference(case, fisher_q):
    compare_with_reference(triton_backend, case, DEVICE, fisher_q=fisher_q)


@pytest.mark.parametrize("fisher_q", [0, 4])
def test_triton_matches_reference_for_other_fisher_powers(fisher_q):
    compare_with_reference(triton_backend, ("many", 0.2, 0.3, 0.5, 0.5, True), DEVICE, fisher_q=fisher_q)


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


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_backend.check_device(torch.device("cpu"))


@pytest.mark.parametrize("fisher_q", [-1, 2])
def test_theta_window_across_steps(fisher_q):
    _, misses = compare_over_steps(triton_backend, [0.2, 0.21, 0.22, 0.6, 0.61], device=DEVICE, regrow=0.2,
                                   layout="many", fisher_q=fisher_q)
    assert misses == 1  # only the jump to 0.6


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("fisher_q", [-1, 2])
def test_other_adam_constants_match_reference(hyper, fisher_q):
    compare_with_reference(triton_backend, ("odd", 0.3, 0.5, 0.2, 0.5, True), DEVICE, fisher_q=fisher_q, **hyper)
