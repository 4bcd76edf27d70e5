"""Must show 3 and 4: the run ends at exactly floor(R N) pruned; pruned entries hold
w = m = v = 0; non-prunable parameters are never zeroed; regrowth (docs/algorithm.md §1.6, 2.2)."""
import math

import pytest
import torch

import agip
from conftest import TinyLM, batch, train


def prunable_state(opt):
    out = []
    for g in opt.param_groups:
        if g["prune"]:
            for p in g["params"]:
                st = opt.state[p]
                out.append((p, st["mask"], st["exp_avg"], st["exp_avg_sq"]))
    return out


@pytest.mark.parametrize("target", [0.3, 0.5])
@pytest.mark.parametrize("schedule", ["exp", "cubic"])
def test_run_ends_at_exact_target_and_pruned_entries_are_zero(target, schedule):
    model = TinyLM()
    groups = agip.param_groups(model)
    other = [p for g in groups if not g["prune"] for _, p in g["params"]]
    T = 30
    opt = agip.AGIP(groups, preset="thesis", lr=1e-2, target_sparsity=target, schedule=schedule, total_steps=T)
    N = opt.sparsity_report()["n_prunable"]
    history = []

    def check(t):
        for p, mask, m, v in prunable_state(opt):
            dead = ~mask
            assert not p[dead].any() and not m[dead].any() and not v[dead].any()
        for p in other:
            assert bool((p != 0).all()), "a non-prunable parameter was zeroed"
        history.append(opt.sparsity_report()["n_pruned"])

    train(model, opt, T, after_step=check)
    assert history[-1] == math.floor(target * N)
    assert all(a <= b for a, b in zip(history, history[1:])), "sparsity decreased"
    assert history[0] == 0 and history[T // 2] > 0
    rep = opt.sparsity_report()
    assert rep["sparsity_prunable"] == history[-1] / N
    assert rep["sparsity_all"] == history[-1] / rep["n_params"] < rep["sparsity_prunable"]
    dens = rep["layer_density"]
    sizes = {n: p.numel() for g in opt.param_groups if g["prune"] for n, p in zip(g["param_names"], g["params"])}
    assert set(dens) == set(sizes)
    assert round(sum(dens[n] * sizes[n] for n in dens)) == N - history[-1]


def test_regrowth_revives_the_largest_gradients_and_keeps_sparsity():
    model = TinyLM()
    phi = 0.25
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-2, target_sparsity=0.4, schedule="oneshot",
                    warmup_steps=2, regrow_fraction=phi, stability=False)
    train(model, opt, 3)  # pruned at step 2 and 3
    N = opt.sparsity_report()["n_prunable"]
    k = math.floor(0.4 * N)
    for t in range(3, 6):
        loss = model(batch(t))
        loss.backward()
        state = prunable_state(opt)
        masks = torch.cat([m.reshape(-1).clone() for _, m, _, _ in state])
        grads = torch.cat([p.grad.reshape(-1).clone() for p, _, _, _ in state])
        pruned = (~masks).nonzero().squeeze(1)
        n_g = math.floor(phi * pruned.numel())
        top = pruned[torch.topk(grads[pruned].abs(), n_g).indices]
        opt.step(loss=loss)
        opt.zero_grad()
        after = torch.cat([m.reshape(-1) for _, m, _, _ in prunable_state(opt)])
        assert n_g > 0 and bool(after[top].all()), "a top-|g| pruned entry was not regrown"
        assert opt.sparsity_report()["regrown"] == n_g
        assert int((~after).sum()) == k
        # regrown entries start the next step from w = m = v = 0
        w_all = torch.cat([p.detach().reshape(-1) for p, _, _, _ in prunable_state(opt)])
        m_all = torch.cat([m.reshape(-1) for _, _, m, _ in prunable_state(opt)])
        assert not w_all[top].any() and not m_all[top].any()


def test_prune_interval_changes_the_mask_only_on_pruning_steps():
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-2, target_sparsity=0.5, total_steps=20,
                    warmup_steps=2, prune_interval=5)
    seen = []
    train(model, opt, 20, after_step=lambda t: seen.append(opt.sparsity_report()["n_pruned"]))
    changes = [t + 1 for t in range(1, 20) if seen[t] != seen[t - 1]]
    assert changes and all((t - 2) % 5 == 0 for t in changes), changes
    assert seen[-1] == int(0.5 * opt._flat.n_prunable)  # the last pruning step (17) snaps to the target


def test_saliency_ema_is_kept_and_zero_on_pruned_entries():
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-2, target_sparsity=0.3, total_steps=12, saliency_ema=0.9)
    train(model, opt, 12)
    for g in opt.param_groups:
        if g["prune"]:
            for p in g["params"]:
                ema, mask = opt.state[p]["saliency_ema"], opt.state[p]["mask"]
                assert bool((ema[mask] > 0).any()) and not ema[~mask].any()
    assert opt.sparsity_report()["sparsity_prunable"] == pytest.approx(0.3, abs=1e-3)


def test_apply_masks_sets_masks_and_zeroes_state():
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-2, target_sparsity=0.3, total_steps=50, warmup_steps=40)
    train(model, opt, 2)  # moments are non-zero now
    w = model.layers[0].up_proj.weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    opt.apply_masks({"layers.0.up_proj.weight": mask})
    st = opt.state[w]
    assert torch.equal(st["mask"], mask)
    assert not w[~mask].any() and not st["exp_avg"][~mask].any() and not st["exp_avg_sq"][~mask].any()
    assert bool(w[mask].ne(0).all())
    train(model, opt, 3, start=2)  # no pruning step yet: the mask stays fixed, pruned stay zero
    assert torch.equal(opt.state[w]["mask"], mask) and not w[~mask].any()
    with pytest.raises(ValueError, match="not a prunable parameter"):
        opt.apply_masks({"lm_head.weight": torch.ones_like(model.lm_head.weight, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        opt.apply_masks({w: torch.ones(3, dtype=torch.bool)})
