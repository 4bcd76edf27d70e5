"""Must show 2: the global threshold is exact (docs/algorithm.md §2.3)."""
import math

import pytest
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


def one_shot(w, g, k):
    """Prune exactly once (oneshot schedule, no lr) and return (mask, theta)."""
    p = torch.nn.Parameter(w.clone())
    n = w.numel()
    ratio = (k + 0.5) / n  # floor(ratio * n) == k
    opt = agip.AGIP([{"params": [p], "prune": True}], lr=0.0, weight_decay=0.0, ta_gamma=0.0,
                    target_sparsity=ratio, schedule="oneshot", warmup_steps=0, stability=False)
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
