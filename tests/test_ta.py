"""Must show 7: with ta_gamma > 0 the step differs from AdamW's by exactly lr * s * g_hat,
s as in docs/algorithm.md §1.5 with the TA clip C (eq. 4.9-4.15), against a hand computation."""
import math

import pytest
import torch

import agip


def one_step(w0, g, loss, lr, **ta):
    p = torch.nn.Parameter(w0.clone())
    opt = agip.TAAdamW([p], lr=lr, weight_decay=0.01, **ta)
    p.grad = g.clone()
    opt.step(loss=loss)
    return p.detach().double(), opt


def hand_s(g, loss, gamma, beta, k, C, eps, floor, max_norm):
    G = math.sqrt(sum(x * x for x in g.double().tolist()))
    c = min(1.0, max_norm / (G + 1e-6))
    ghat_norm = c * G
    e = max(loss - floor, 0.0)
    s = gamma * math.tanh(k * e) * e**beta / (ghat_norm**2 + eps)
    clipped = s * ghat_norm > C
    if clipped:
        s = C / ghat_norm
    return s, c, clipped


@pytest.mark.parametrize("case", [
    dict(loss=0.3, gamma=0.5, C=100.0, floor=0.0, max_norm=10.0),  # TA clip does not bind
    dict(loss=3.0, gamma=2.0, C=0.05, floor=0.0, max_norm=10.0),  # TA clip binds
    dict(loss=3.0, gamma=2.0, C=100.0, floor=1.0, max_norm=0.5),  # grad clipping and a floor
    dict(loss=0.5, gamma=2.0, C=100.0, floor=1.0, max_norm=10.0),  # below the floor: s = 0
])
def test_ta_step_is_adamw_plus_lr_s_ghat(case):
    w0 = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75])
    g = torch.tensor([0.3, -0.2, 0.1, 0.05, -0.4])
    lr, beta, k, eps = 0.1, 0.5, 1.0, 1e-8
    common = dict(max_grad_norm=case["max_norm"], ta_beta=beta, ta_k=k, ta_eps=eps, ta_loss_floor=case["floor"])
    w_adam, _ = one_step(w0, g, case["loss"], lr, ta_gamma=0.0, **common)
    w_ta, opt = one_step(w0, g, case["loss"], lr, ta_gamma=case["gamma"], ta_clip=case["C"], **common)
    s, c, clipped = hand_s(g, case["loss"], case["gamma"], beta, k, case["C"], eps, case["floor"], case["max_norm"])
    expected = -lr * s * c * g.double()
    assert torch.allclose(w_ta - w_adam, expected, rtol=1e-5, atol=1e-7)
    # G^2 sums fp32 squares (as the fused kernels do): a few fp32 ulps from the fp64 hand value
    assert opt.sparsity_report()["ta_scale"] == pytest.approx(s, rel=1e-6)
    if case["floor"] and case["loss"] < case["floor"]:
        assert s == 0 and torch.equal(w_ta, w_adam)
    else:
        assert (w_ta - w_adam).abs().max() > 1e-4  # the term is visible at this lr
    if clipped:  # eq. 4.12: the optimizer's TA move has norm exactly lr * C
        assert (w_ta - w_adam).norm().item() == pytest.approx(lr * case["C"], rel=1e-5)


def test_ta_scale_function_matches_the_formula():
    s = agip.ta_scale(2.0, 4.0, gamma=1.0, beta=0.5, k=1.0, clip=1e9, eps=0.0)
    assert s == pytest.approx(math.tanh(2.0) * math.sqrt(2.0) / 4.0)
    assert agip.ta_scale(2.0, 4.0, gamma=0.0, beta=0.5, k=1.0, clip=1.0, eps=1e-8) == 0.0
    # the TA vector's norm s * sqrt(G^2) never exceeds the clip
    assert agip.ta_scale(5.0, 1e-6, gamma=1.0, beta=0.5, k=1.0, clip=1.0, eps=1e-8) * 1e-3 == pytest.approx(1.0)


def test_pruned_entries_stay_zero_and_get_no_ta_move():
    # TA on, one pruning step then more: pruned entries hold exactly 0 (the TA term uses the
    # gradient of the active network, g * M, so it cannot move them)
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5]))
    opt = agip.AGIP([{"params": [p], "prune": True}], lr=0.1, ta_gamma=5.0, ta_clip=10.0, target_sparsity=0.5,
                    schedule="oneshot", warmup_steps=0, stability=False, saliency="taylor")
    for t in range(4):
        p.grad = torch.tensor([0.3, -0.21, 0.1, 0.05, -0.4, 0.2]) * (t + 1)  # no ties in |w g|
        opt.step(loss=3.0)
        pruned = ~opt.state[p]["mask"]
        assert int(pruned.sum()) == 3 and torch.equal(p.detach()[pruned], torch.zeros(3))
    assert opt.sparsity_report()["ta_scale"] > 0
