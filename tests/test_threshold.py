"""Must show 2: the global threshold is exact (docs/algorithm.md §2.3)."""
import math

import pytest
import numpy as np
import torch

import agip
from agip.threshold import radix_select, torch_histogram


def awkward_values(n, seed):
    """Random non-negative fp32 values with many ties, exact zeros and +inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g) * 10.0 ** torch.randint(-30, 30, (n,), generator=g)
    pool = x[torch.randint(0, n, (max(1, n // 20),), generator=g)]
    ties = torch.rand(n, generator=g) < 0.4
    x[ties] = pool[torch.randint(0, pool.numel(), (int(ties.sum()),), generator=g)]
    x[torch.rand(n, generator=g) < 0.15] = 0.0
    x[torch.rand(n, generator=g) < 0.05] = math.inf
    return x


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (7, 2), (1000, 3), (65537, 4)])
def test_radix_select_matches_kthvalue(n, seed):
    x = awkward_values(n, seed)
    ks = {1, 2, n - 1, n, n // 2, n // 3} & set(range(1, n + 1))
    for k in sorted(ks):
        assert radix_select(k, torch_histogram(x)) == float(torch.kthvalue(x, k).values), k


def test_radix_select_on_all_equal_and_subnormal_values():
    x = torch.full((100,), 1e-45)  # the smallest subnormal: low bits decide
    x[50:] = 0.0
    assert radix_select(50, torch_histogram(x)) == 0.0
    assert radix_select(51, torch_histogram(x)) == float(x[0])


def test_radix_select_rejects_k_out_of_range():
    x = torch.rand(10)
    with pytest.raises(ValueError, match="k"):
        radix_select(11, torch_histogram(x))
    with pytest.raises(ValueError, match="k must be >= 1"):
        radix_select(0, torch_histogram(x))


def one_shot(w, g, k, **kw):
    """Prune exactly once (oneshot schedule, no lr) and return (mask, theta)."""
    p = torch.nn.Parameter(w.clone())
    n = w.numel()
    ratio = (k + 0.5) / n  # floor(ratio * n) == k
    opt = agip.AGIP([{"params": [p], "prune": True}], lr=0.0, weight_decay=0.0, ta_gamma=0.0,
                    target_sparsity=ratio, schedule="oneshot", warmup_steps=0, stability=False,
                    **{"saliency": "taylor", **kw})
    p.grad = g.clone()
    opt.step()
    return opt.state[p]["mask"].clone(), opt.sparsity_report()["theta"], p.detach().clone()


@pytest.mark.parametrize("k_of", [lambda n: 0, lambda n: 1, lambda n: n - 1, lambda n: n // 3])
def test_mask_is_saliency_above_exact_threshold(k_of):
    n = 999
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-4, 5, (n,), generator=gen).float() * 0.25  # many ties and zeros
    g = torch.randn(n, generator=gen).sign() * torch.randint(0, 3, (n,), generator=gen).float()
    k = k_of(n)
    mask, theta, w_after = one_shot(w, g, k)
    s = (w * g).abs()
    if k == 0:
        assert theta == -1.0 and bool(mask.all())
    else:
        assert theta == float(torch.kthvalue(s, k).values)
        assert torch.equal(mask, s > theta)
        assert int((~mask).sum()) >= k  # ties at theta are pruned
    assert torch.equal(w_after, w * mask)  # lr = 0: only the mask acts
    mask2, theta2, _ = one_shot(w, g, k)
    assert torch.equal(mask, mask2) and theta == theta2


def test_exactly_k_pruned_without_ties():
    n = 4097
    gen = torch.Generator().manual_seed(6)
    w, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    for k in (1, n - 1, 1234):
        mask, _, _ = one_shot(w, g, k)
        assert int((~mask).sum()) == k


def test_overflowing_saliency_is_plus_inf_and_kept():
    w = torch.tensor([1e36, 1.0, 2.0, 3.0])
    g = torch.tensor([1e4, 1.0, 1.0, 1.0])  # |w g| overflows fp32 to +inf: the most salient
    mask, theta, _ = one_shot(w, g, 3)
    assert theta == 3.0 and mask.tolist() == [True, False, False, False]


@pytest.mark.parametrize("power", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_fisher_threshold_against_a_hand_computation(power, backend):
    """algorithm.md §2.1b on a first step (v = 0): v_t = (1 - beta2) ghat^2 with ghat the
    clipped gradient, S = |w| v_t^p; the mask keeps S > theta, theta the exact k-th smallest."""
    if backend == "cpp":
        pytest.importorskip("agip.backends.cpp", reason="the C++ backend did not build here")
    gen = torch.Generator().manual_seed(3)
    n, k = 777, 300
    w = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * 0.1  # ||g|| ~ 2.8 > max_grad_norm = 1: the clip binds
    mask, theta, _ = one_shot(w, g, k, saliency="fisher", fisher_power=power, max_grad_norm=1.0, backend=backend)
    clip = min(1.0, 1.0 / (float(torch.sum(g.double() ** 2)) ** 0.5 + 1e-6))
    assert clip < 1
    ghat = g * clip
    vt = (torch.zeros(n) * 0.999 + float(np.float32(1 - 0.999)) * ghat * ghat).numpy()
    root = np.sqrt  # IEEE square root, correctly rounded (torch.sqrt on the CPU is not always)
    s = torch.from_numpy(w.abs().numpy() * {0.0: np.ones(n, np.float32), 0.25: root(root(vt)), 0.5: root(vt),
                                            1.0: vt}[power])
    expect = float(torch.kthvalue(s, k).values)
    assert theta == expect
    assert torch.equal(mask, s > expect) and int((~mask).sum()) == k


def test_fisher_refuses_prunable_groups_with_different_beta2():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    groups = [{"params": [a], "prune": True, "betas": (0.9, 0.999)}, {"params": [b], "prune": True, "betas": (0.9, 0.99)}]
    with pytest.raises(ValueError, match="one beta2"):
        agip.AGIP(groups, saliency="fisher", total_steps=10)
    agip.AGIP(groups, saliency="taylor", total_steps=10)  # the Taylor score has no such need
    with pytest.raises(ValueError, match="fisher_power"):
        agip.AGIP([a], saliency="fisher", fisher_power=0.3, total_steps=10)
    with pytest.raises(ValueError, match="saliency"):
        agip.AGIP([a], saliency="hessian", total_steps=10)
    with pytest.raises(ValueError, match="preset"):
        agip.AGIP([a], preset="fast", total_steps=10)


def test_reference_sqrt_is_correctly_rounded():
    from agip.backends.reference import sqrt_rn

    x = torch.cat([torch.rand(200_000) * 10.0 ** torch.randint(-30, 30, (200_000,)).float(),
                   torch.tensor([0.0, 1.0, 4.0, 2.0, 1e-45, 3.4e38, float("inf")])])
    assert torch.equal(sqrt_rn(x), torch.from_numpy(np.sqrt(x.numpy())))
