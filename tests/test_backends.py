"""Every fused backend against the reference, through one ``fused`` fixture (cpp, and
triton: on CUDA, or interpreted on the CPU with TRITON_INTERPRET=1 and small blocks):
masks, theta and the regrowth decision bit-identical, G^2 within 1e-6, w/m/v within
backend_cases.MAX_ULPS. What only one backend has (cpp's kept band and threads, triton's
interpreter check) is tested in test_cpp_backend.py / test_triton_backend.py."""
import importlib
import math

import pytest
import torch

from agip.backends import reference
from backend_cases import ALL_SCORES, CASES, HYPERS, SCORES, compare_over_steps, compare_scores_ahead, \
    compare_with_reference, make_flat, make_plan, run_backend

DEVICES = {"cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


@pytest.fixture(params=sorted(DEVICES))
def fused(request, monkeypatch):
    """(backend module, device) for each fused backend that loads here."""
    name = request.param
    try:
        module = importlib.import_module(f"agip.backends.{name}")
    except ImportError as e:
        pytest.skip(f"the {name} backend is not available: {e}")
    if name == "triton":
        monkeypatch.setattr(module, "block", 64)  # many programs per launch on small buffers, partial last blocks
    return module, DEVICES[name]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fisher_q", SCORES)
def test_matches_reference(fused, case, seed, fisher_q):
    backend, device = fused
    compare_with_reference(backend, case, device, seed=seed, fisher_q=fisher_q)


@pytest.mark.parametrize("fisher_q", ALL_SCORES)
@pytest.mark.parametrize("case", [("odd", 0.3, 0.5, 0.2, 0.0, True), ("many", 0.2, 0.3, 0.5, 0.5, True)])
def test_matches_reference_for_every_fisher_power(fused, case, fisher_q):
    backend, device = fused
    compare_with_reference(backend, case, device, seed=2, fisher_q=fisher_q)


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("fisher_q", [-1, 2])
def test_other_adam_constants_match_reference(fused, hyper, fisher_q):
    backend, device = fused
    compare_with_reference(backend, ("odd", 0.3, 0.5, 0.2, 0.5, True), device, fisher_q=fisher_q, **hyper)


@pytest.mark.parametrize("fisher_q", [-1, 2])
def test_theta_window_misses_only_on_a_jump(fused, fisher_q):
    backend, device = fused
    _, misses = compare_over_steps(backend, [0.2, 0.21, 0.22, 0.6, 0.61], device=device, regrow=0.2, layout="many",
                                   fisher_q=fisher_q)
    assert misses == 1  # only the jump to 0.6


def test_two_runs_are_identical(fused):
    backend, device = fused
    results = []
    for _ in range(2):
        flat, _ = make_flat("many", pruned=0.2, ema=True, device=device)
        plan = make_plan(flat, 0.4, regrow=0.3, ema_rho=0.5)
        g2, sel = run_backend(backend, flat, plan)
        results.append((g2, sel, [torch.cat([b.w, b.m, b.v]).cpu() for b in flat.buckets]))
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_non_finite_gradient_on_a_pruned_entry_makes_g2_non_finite(fused):
    backend, device = fused
    flat, _ = make_flat("odd", pruned=0.5, device=device)
    b = flat.buckets[0]
    b.g[int((~b.mask).nonzero()[0])] = math.inf
    plan = make_plan(flat, 0.5)
    assert not math.isfinite(backend.grad_sumsq(flat, plan))
    assert not math.isfinite(reference.grad_sumsq(flat, plan))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fisher_q", [1, 2])
def test_fisher_score_of_the_previous_moment_matches_reference(fused, case, fisher_q):
    backend, device = fused
    compare_with_reference(backend, case, device, fisher_q=fisher_q, moment="previous")


@pytest.mark.parametrize("fisher_q", [1, 2])
def test_previous_moment_is_histogrammed_in_pass_a_and_windowed(fused, fisher_q):
    backend, device = fused
    _, misses = compare_over_steps(backend, [0.2, 0.21, 0.22, 0.6, 0.61], device=device, regrow=0.2, layout="many",
                                   fisher_q=fisher_q, moment="previous")
    assert misses == 1  # only the jump to 0.6


def test_previous_moment_scores_the_stored_v():
    # algorithm.md §2.1b with fisher_moment="previous": S = |w| v^(q/4) of the v the last
    # update stored, without this step's gradient
    flat, _ = make_flat("odd", pruned=0.3)
    b = flat.buckets[0]
    plan = make_plan(flat, 0.5, fisher_q=1, moment="previous")
    assert not plan.score_needs_clip and make_plan(flat, 0.5, fisher_q=1).score_needs_clip
    P = b.n_prunable
    want = b.w[:P].abs() * reference.sqrt_rn(reference.sqrt_rn(b.v[:P]))
    assert torch.equal(reference.saliency(b, plan), want)


# a ramp: theta in the kept band, a jump out of the window (a miss), regrowth, the end of the
# ramp (k no larger than the entries staying pruned: theta = 0), a step of the ramp again
RAMP = [0.2, 0.22, 0.24, 0.5, 0.52, 0.52, 0.53]


@pytest.mark.parametrize("fisher_q", [1, 2])
@pytest.mark.parametrize("regrow", [0.0, 0.2])
def test_scores_ahead_match_reference(fused, fisher_q, regrow):
    # docs/design.md "Scores ahead": the update of step t histograms S_(t+1) = |w_t| v_t^p, so
    # step t+1's pass A reads g and the mask only; theta and the masks stay the reference's
    backend, device = fused
    st = compare_scores_ahead(backend, RAMP, device=device, regrow=regrow, fisher_q=fisher_q)
    assert st.ahead_hits == len(RAMP) - 1  # every step after the first used the update's histogram
    assert st.window_misses >= 1  # the jump to 0.5
    if backend._driver.k.candidates:
        assert st.band_hits >= 1  # the kept band, collected by the update


def test_scores_ahead_not_used_after_a_write(fused):
    # a step told that the buffers were written since (ahead_valid False) histograms its own scores
    backend, device = fused
    valid = [True, True, False, True, False, True]
    st = compare_scores_ahead(backend, RAMP[:6], device=device, valid=valid)
    assert st.ahead_hits == sum(valid[1:])  # steps 2..6, where nothing wrote in between
