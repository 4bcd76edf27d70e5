"""Must show 6: 10 steps -> state_dict -> fresh model + optimizer -> 10 steps is
bit-identical to 20 straight steps (docs/design.md: a resumed run continues bit for bit)."""
import io

import pytest
import torch

import agip
from conftest import TinyLM, train

SETTINGS = dict(lr=1e-2, target_sparsity=0.5, total_steps=20, regrow_fraction=0.1, saliency_ema=0.5,
                stability_window=4, ta_gamma=5.0, ta_clip=10.0)


def fresh(preset="thesis"):
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), preset=preset, **SETTINGS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 25)
    return model, opt, sched


def run(model, opt, sched, steps, start):
    def after(t):
        sched.step()
    return train(model, opt, steps, start=start, after_step=after)


@pytest.mark.parametrize("preset", ["thesis", "default"])
def test_resume_is_bit_identical(preset):
    m_ref, o_ref, s_ref = fresh(preset)
    run(m_ref, o_ref, s_ref, 20, 0)

    m1, o1, s1 = fresh(preset)
    run(m1, o1, s1, 10, 0)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "sched": s1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    m2, o2, s2 = fresh(preset)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    s2.load_state_dict(saved["sched"])
    run(m2, o2, s2, 10, 10)

    for (name, a), b in zip(m_ref.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), name
    for p_ref, p2 in zip(m_ref.parameters(), m2.parameters()):
        for key, val in o_ref.state[p_ref].items():
            assert torch.equal(val, o2.state[p2][key]), key
    r_ref, r2 = o_ref.sparsity_report(), o2.sparsity_report()
    assert r_ref == r2
    assert r2["step"] == 20 and r2["n_pruned"] > 0 and r2["regrown"] > 0


def test_load_state_dict_refuses_a_mismatch_and_changes_nothing():
    model, opt, _ = fresh()
    train(model, opt, 3)
    other_model = TinyLM(d=8)
    other = agip.AGIP(agip.param_groups(other_model), **SETTINGS)
    before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="not an AGIP state dict"):
        opt.load_state_dict(torch.optim.AdamW(TinyLM().parameters()).state_dict())
    for k, v in opt.state[next(model.parameters())].items():
        assert torch.equal(v, before[k])
    assert opt.step_count == 3
