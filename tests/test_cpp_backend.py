"""What only the C++ backend has, against the reference (the cases every fused backend
shares are in test_backends.py): many 65,536-entry chunks, bf16 buffers, the same results
with 1 and 2 threads, the threshold window on a ramp and the kept band of candidate keys."""
import copy
import math

import pytest
import torch

from backend_cases import SCORES, compare_over_steps, compare_with_reference, make_flat, make_plan, run_backend

cpp = pytest.importorskip("agip.backends.cpp", reason="the C++ backend did not build here")


@pytest.mark.parametrize("case", [
    ("large", 0.3, 0.5, 0.2, 0.5, True),
    ("large", 0.0, 0.3, 0.0, 0.0, True),
    ("large", 0.3, 0.5, 0.0, 0.0, False),
])
@pytest.mark.parametrize("fisher_q", SCORES)
def test_cpp_matches_reference_over_many_chunks(case, fisher_q):
    compare_with_reference(cpp, case, fisher_q=fisher_q)


@pytest.mark.parametrize("fisher_q", SCORES)
def test_cpp_matches_reference_in_bfloat16(fisher_q):
    # bf16 x bf16 products are exact in fp32, so saliency and masks still match bit for bit
    compare_with_reference(cpp, ("odd", 0.3, 0.5, 0.2, 0.5, True), dtype=torch.bfloat16, fisher_q=fisher_q)


def test_thread_count_does_not_change_results():
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            flat, _ = make_flat("large", pruned=0.2, ema=True)
            plan = make_plan(flat, 0.4, regrow=0.3, ema_rho=0.5, fisher_q=2)
            g2, sel = run_backend(cpp, flat, plan)
            results.append((g2, sel, [torch.cat([b.w, b.m, b.v, b.ema]) for b in flat.buckets],
                            [b.mask.clone() for b in flat.buckets]))
    finally:
        torch.set_num_threads(old)
    (g1, s1, t1, m1), (g2, s2, t2, m2) = results
    assert g1 == g2 and s1 == s2
    assert all(torch.equal(a, b) for a, b in zip(m1, m2))
    assert all(torch.equal(a, b) for a, b in zip(t1, t2))


def test_auto_picks_cpp_on_cpu():
    from agip import backends

    assert backends.resolve("auto", torch.device("cpu")) is cpp
    with pytest.raises(ValueError, match="CPU tensors"):
        cpp.check_device(torch.device("cuda"))


@pytest.mark.parametrize("regrow,rho,fisher_q", [(0.0, 0.0, -1), (0.2, 0.5, -1), (0.0, 0.0, 2), (0.2, 0.5, 1)])
def test_theta_window_across_steps(regrow, rho, fisher_q):
    # k creeps up (theta, a low quantile of the active saliencies, stays inside the window
    # below the last one), jumps (theta leaves it: the first digit again, in full), and
    # creeps on
    thetas, misses = compare_over_steps(cpp, [0.2, 0.21, 0.22, 0.6, 0.61, 0.62, 0.63], regrow=regrow, rho=rho,
                                        fisher_q=fisher_q)
    assert len(set(thetas)) == len(thetas)
    if rho == 0:
        assert misses == 1  # only the jump
    else:
        assert misses <= 1  # the EMA damps the jump


RAMP = [0.1, 0.13, 0.155, 0.175, 0.19, 0.2, 0.205, 0.208]  # like a cubic ramp: k grows by less each step


@pytest.mark.parametrize("rho", [0.0, 0.5])
@pytest.mark.parametrize("fisher_q", [-1, 1, 2])
def test_candidate_keys_give_the_second_digit(fisher_q, rho):
    # on a ramp with the scores drifting as in training, theta's first digit lands in the
    # band where pass A kept the keys: no refine pass, and theta and masks still equal the
    # reference's at every step
    sc = {}
    compare_over_steps(cpp, RAMP, fisher_q=fisher_q, rho=rho, fresh_grads=False, scratch=sc)
    assert sc.get("window_misses", 0) == 0
    # every step but the first (a full pass: no band); with the EMA (decaying from its
    # random start) theta falls ever faster and the band, which expects slowing, misses some
    assert sc.get("band_hits", 0) >= (len(RAMP) - 1 if rho == 0 else 2)


def test_too_many_candidate_keys_fall_back_to_the_refine_pass(monkeypatch):
    from agip.backends import fused

    monkeypatch.setattr(fused, "CANDIDATE_SHARE", 10**9)
    monkeypatch.setattr(fused, "CANDIDATE_MIN", 16)  # room for 16 keys: too few here
    sc = {}
    compare_over_steps(cpp, RAMP, fisher_q=1, fresh_grads=False, scratch=sc)
    assert sc.get("band_hits", 0) == 0 and sc["cand"] is None


def test_theta_is_zero_once_k_is_within_the_pruned_entries():
    # after the ramp (k no larger than the entries already pruned) theta is 0 without a
    # histogram, as the reference's k-th smallest of scores that include those zeros
    sc = {}
    thetas, _ = compare_over_steps(cpp, [0.3, 0.3, 0.2, 0.3], fisher_q=1, fresh_grads=False, scratch=sc)
    assert thetas[0] > 0 and thetas[1:] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("fisher_q", [-1, 1])
def test_stats_collects_exactly_the_keys_in_the_band(fisher_q):
    # the kernel's own contract: cand holds the fp32 bits of every active score whose first
    # digit lies in [cand_lo, cand_hi] (inside the window), and no other
    from agip.backends import reference

    flat, _ = make_flat("large", pruned=0.3)
    plan = make_plan(flat, 0.4, fisher_q=fisher_q)
    b = flat.buckets[0]
    P = b.n_prunable
    keys = reference.saliency(b, plan)[b.mask].view(torch.int32).long()
    mid = int(keys.median()) >> 16
    lo, hi, clo, chi = 0, mid + 40, mid - 5, mid + 5
    sal, grow = torch.zeros(65536, dtype=torch.int32), torch.zeros(65536, dtype=torch.int32)
    cand, n = torch.empty(P, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    cpp._ext.stats(b.g[:P], b.w[:P], b.v[:P], b.mask, b.ema, P, True, False, *plan.score_args(),
                   lo, hi, sal, grow, False, cand, n, clo, chi)
    want = keys[((keys >> 16) >= clo) & ((keys >> 16) <= chi)].sort().values
    assert int(n) == want.numel() > 0
    assert torch.equal(cand[: int(n)].long().sort().values, want)
    # the window's histogram: in-window bins exact, the rest lumped above it
    assert int(sal[hi + 1]) == int(((keys >> 16) > hi).sum())
    assert torch.equal(sal[: hi + 1].long(), torch.bincount(keys[(keys >> 16) <= hi] >> 16, minlength=hi + 1))


def scores_near(b, plan, theta, seed):
    """Sets the prunable weights of bucket ``b`` so that their scores lie 0-8 ulps either side
    of theta, a third of them 2^-8..2^-23 (relative) away, with either sign; then zeros,
    subnormals, inf and NaN in w, in v and in both; pruned entries w = 0."""
    from agip.backends import reference

    gen = torch.Generator().manual_seed(seed)
    P = b.n_prunable
    w = b.w[:P]
    w.fill_(1.0)
    factor = reference.saliency(b, plan).clone()  # |1| * v^p: the fp32 factor
    w.copy_(theta / factor)
    steps = torch.randint(-8, 9, (P,), generator=gen)
    for j in range(1, 9):  # nudge w by 0..8 ulps: scores on, above and below theta
        w.copy_(torch.where(steps >= j, torch.nextafter(w, torch.tensor(math.inf)), w))
        w.copy_(torch.where(-steps >= j, torch.nextafter(w, torch.tensor(-math.inf)), w))
    # a third moved 2^-8..2^-23 (relative) away: either side of such a margin
    far = torch.rand(P, generator=gen) < 1 / 3
    rel = torch.exp2(-8.0 - 15.0 * torch.rand(P, generator=gen)) * torch.where(steps > 0, 1.0, -1.0)
    w.copy_(torch.where(far, w * (1.0 + rel), w))
    w.mul_(torch.where(torch.rand(P, generator=gen) < 0.5, -1.0, 1.0))
    odd = [0.0, 1e-40, -1e-40, math.inf, -math.inf, math.nan, 1e-20, 3e38]
    for i, x in enumerate(odd):  # w odd, then v odd, then both
        w[i] = x
        b.v[100 + i] = abs(x) if x == x else x
        w[200 + i], b.v[200 + i] = x, abs(x)
    w[~b.mask] = 0.0  # pruned: w = 0


@pytest.mark.parametrize("moment", ["current", "previous"])
@pytest.mark.parametrize("fisher_q", [1, 2])
@pytest.mark.parametrize("theta", [0.0123, 2.0**-90, 2.0**90, 2.0**-110, 0.0, -1.0, 3e38])
def test_fisher_masks_next_to_theta_match_reference(fisher_q, moment, theta):
    # the update's own M' = (S > theta), theta given: scores 0-8 ulps either side of theta,
    # a third 2^-8..2^-23 away, zeros, subnormals, inf and NaN, a tiny, zero, negative and
    # huge theta must give the reference's mask bit for bit (what any faster way of
    # deciding it must keep; a decision without square roots, tried, passed it with a
    # margin of 2^-16 around theta^4 and failed it with 2^-30: docs/performance.md, "On a CPU without AVX-512")
    from agip.backends import reference

    def crafted():
        flat, _ = make_flat("many", pruned=0.2)
        plan = make_plan(flat, 0.5, regrow=0.3, fisher_q=fisher_q, moment=moment)
        plan.theta, plan.regrow_theta = theta, 0.5
        scores_near(flat.buckets[0], plan, theta, seed=1)  # (regrowth decides by |g| > 0.5)
        return flat, plan

    ref, plan = crafted()
    other, _ = crafted()
    s = reference.saliency(ref.buckets[0], plan)
    if theta == 0.0123:  # the test means something: scores on theta and one ulp either side
        t = torch.tensor(theta, dtype=torch.float32)
        for near in (t, torch.nextafter(t, torch.tensor(1.0)), torch.nextafter(t, torch.tensor(0.0))):
            assert int((s == near).sum()) > 10
    reference.update(ref, plan)
    cpp.update(other, plan)
    for rb, ob in zip(ref.buckets, other.buckets):
        assert torch.equal(rb.mask, ob.mask)


def crafted_ahead(fisher_q, theta):
    """A flat state and a pruning plan with scores ahead and no regrowth (the update's one-loop
    AVX-512 path) whose scores lie 0-8 ulps and 2^-8..2^-23 either side of theta and, after the
    update, of the first value of bin ``flat.top``, with zeros, subnormals, inf and NaN."""
    flat, _ = make_flat("many", pruned=0.2)
    plan = make_plan(flat, 0.5, fisher_q=fisher_q, moment="previous")
    # no gradient and no momentum: the update leaves w (group 0 has no decay) and makes v beta2 v,
    # so the next score is this one times beta2^p: theta is chosen so that it starts bin top
    top = int(torch.tensor(theta, dtype=torch.float32).view(torch.int32)) >> 16
    beta2_p = float(torch.tensor(0.999, dtype=torch.float32)) ** (fisher_q / 4)
    theta = float(torch.tensor(top << 16, dtype=torch.int32).view(torch.float32)) / beta2_p
    plan.theta, plan.regrow_theta, plan.score_ahead = theta, math.inf, True
    b = flat.buckets[0]
    P = b.n_prunable
    b.g[:P], b.m[:P] = 0.0, 0.0
    scores_near(b, plan, theta, seed=3)
    b.g[300:310] = 2.0**66  # ghat^2 overflows: the score of v_(t-1) is NaN in every backend
    b.mask[300:305] = True
    flat.plan, flat.top = plan, top
    return flat


@pytest.mark.parametrize("fisher_q", [0, 1, 2, 4])
@pytest.mark.parametrize("theta", [0.0123, 2.0**-90, 2.0**90, 2.0**-125, 3e38])
def test_scores_ahead_update_is_exact(fisher_q, theta):
    # a pruning step with scores ahead (fp32, the score of v_(t-1), no regrowth) decides the mask,
    # updates and keys the next step's scores in one AVX-512 loop where the CPU has it: scores
    # 0-8 ulps and 2^-8..2^-23 either side of theta, the next ones as close to the window's top,
    # odd values, extreme thetas: the mask must be the reference's, w, m, v the scalar loop's
    # (the same update without scores ahead) and the histogram and keys those pass A finds on the
    # stored values, bit for bit
    from agip.backends import fused, reference

    flat, ref, plain = (crafted_ahead(fisher_q, theta) for _ in range(3))
    plan = flat.plan
    P = flat.buckets[0].n_prunable
    st = cpp._driver.state(flat)
    st.theta_bin, st.theta_moved = flat.top - 1 - fused.WINDOW_MARGIN, 0  # window (0, top - 1), band around theta_bin
    cpp.update(flat, plan)
    reference.update(ref, plan)
    plain_plan = copy.copy(plan)
    plain_plan.score_ahead = False
    cpp.update(plain, plain_plan)
    assert torch.equal(flat.buckets[0].mask, ref.buckets[0].mask)
    for name in ("w", "m", "v", "mask"):
        assert torch.equal(getattr(flat.buckets[0], name).view(torch.int32 if name != "mask" else torch.bool),
                           getattr(plain.buckets[0], name).view(torch.int32 if name != "mask" else torch.bool)), name
    # pass A over the values the update stored, with its window and band: the histogram and keys it made
    lo, hi = st.window
    clo, chi = st.band
    b = flat.buckets[0]
    sal, grow = torch.zeros(65536, dtype=torch.int32), torch.zeros(65536, dtype=torch.int32)
    cand, n = torch.empty(P, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    cpp._ext.stats(b.g[:P], b.w[:P], b.v[:P], b.mask, b.ema, P, True, False, *plan.score_args(),
                   lo, hi, sal, grow, False, cand, n, clo, chi)
    assert torch.equal(st.sal, sal)
    if fisher_q in (1, 2) and theta < 1e38:  # (q = 0, 4 and 3e38: the scores do not straddle the top)
        assert 0 < int(sal[: hi + 1].sum()) and 0 < int(sal[hi + 1])  # scores on both sides of the top
    (keys, count), = st.cand
    assert count == int(n) and torch.equal(keys[:count].sort().values, cand[: int(n)].sort().values)
