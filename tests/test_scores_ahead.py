"""Scores ahead at the optimizer level (docs/design.md "Scores ahead"): with the Fisher score
of v_(t-1) the update of step t histograms step t+1's scores, so a pruning step's pass A
reads what a non-pruning one does. Using that histogram or not must not change a bit, also
when something writes the weights, the masks or the state between steps (the version check
then makes the step histogram its own scores), and a resumed run continues bit for bit."""
import copy
import io

import pytest
import torch

import agip
from conftest import TinyLM, batch

STEPS = 12
pytest.importorskip("agip.backends.cpp", reason="the cpp backend is not available")


def make(ahead=True, **kw):
    torch.manual_seed(0)
    model = TinyLM()
    opts = dict(lr=1e-2, target_sparsity=0.6, total_steps=STEPS, warmup_steps=1, schedule="cubic", saliency="fisher",
                fisher_power=0.25, fisher_moment="previous", ta_gamma=0.0, stability=False, backend="cpp")
    opt = agip.AGIP(agip.param_groups(model), **{**opts, **kw})
    opt._score_ahead = opt._score_ahead and ahead
    return model, opt


def train(model, opt, steps, start=0, between=None):
    for t in range(start, start + steps):
        if between is not None:
            between(t, model, opt)
        loss = model(batch(t))
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()


def hits(opt):
    return opt._flat.scratch["cpp"].ahead_hits


def assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    for (name, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(p, q), name
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        for key, val in oa.state[pa].items():
            assert torch.equal(val, ob.state[pb][key]), key
    assert oa.sparsity_report()["theta"] == ob.sparsity_report()["theta"]


def test_the_first_step_scores_by_v_1():
    # algorithm.md §2.1b: at step 1 v_0 = 0 would tie every score at 0 and prune everything
    model, opt = make(warmup_steps=0)  # step 1 prunes
    train(model, opt, 1)
    n, pruned = opt._flat.n_prunable, opt.sparsity_report()["n_pruned"]
    assert 0 < pruned < 0.5 * n


def test_which_configurations_score_ahead():
    assert make()[1]._score_ahead
    for kw in (dict(fisher_moment="current"), dict(saliency="taylor"), dict(saliency_ema=0.5),
               dict(sparsity_pattern="2:4", target_sparsity=0.5)):
        assert not make(**kw)[1]._score_ahead, kw


def test_scores_ahead_change_nothing():
    with_ahead, without = make(), make(ahead=False)
    train(*with_ahead, STEPS)
    train(*without, STEPS)
    assert_same(with_ahead, without)
    assert hits(with_ahead[1]) == STEPS - 1  # every pruning step after the first (t >= 1 prunes)
    assert hits(without[1]) == 0
    n, pruned = with_ahead[1]._flat.n_prunable, with_ahead[1].sparsity_report()["n_pruned"]
    assert int(0.6 * n) <= pruned <= int(0.65 * n)  # the target, not every entry (ties at theta = 0)


def writes_between_steps(t, model, opt):
    """What users do between steps, each of which the next step must notice."""
    if t == 3:
        with torch.no_grad():
            model.layers[0].up_proj.weight.mul_(0.5)  # a weight written in place
    elif t == 5:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    elif t == 7:
        w = model.layers[1].q_proj.weight
        opt.apply_masks({w: w.detach().abs() > w.detach().abs().median()})
    elif t == 9:
        model.load_state_dict(copy.deepcopy(model.state_dict()))


def test_a_write_between_steps_is_seen():
    with_ahead, without = make(), make(ahead=False)
    train(*with_ahead, STEPS, between=writes_between_steps)
    train(*without, STEPS, between=writes_between_steps)
    assert_same(with_ahead, without)
    # the steps after each of the four writes histogrammed their own scores
    assert hits(with_ahead[1]) == STEPS - 1 - 4


def test_resume_continues_bit_for_bit():
    whole = make()
    train(*whole, STEPS)
    first = make()
    train(*first, STEPS // 2)
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    second = make()
    second[0].load_state_dict(saved["model"])
    second[1].load_state_dict(saved["opt"])
    train(*second, STEPS - STEPS // 2, start=STEPS // 2)
    assert_same(whole, second)
    # the first pruning step after loading histogrammed its own scores, the others used the update's
    assert hits(second[1]) == STEPS - STEPS // 2 - 1
