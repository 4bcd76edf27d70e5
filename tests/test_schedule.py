"""Must show 5: R_t against closed forms; stability factor; monotone; snaps (docs/algorithm.md §3)."""
import math

import pytest

from agip.schedule import SparsitySchedule


def ramp(sched, T, losses=None):
    out = []
    for t in range(1, T + 1):
        loss = losses[t - 1] if losses else 2.0
        r, _ = sched.propose(t, loss)
        sched.commit(r, loss)
        out.append(r)
    return out


def test_defaults_from_total_steps():
    s = SparsitySchedule(0.3, "exp", total_steps=1000)
    assert (s.warmup_steps, s.tau, s.t_end, s.final_prune_step) == (50, 150.0, 750.0, 1000)


@pytest.mark.parametrize("shape", ["exp", "cubic", "oneshot"])
def test_closed_forms_with_a_flat_loss(shape):
    T, R = 200, 0.5
    s = SparsitySchedule(R, shape, total_steps=T)
    got = ramp(s, T)
    tw, tau, tend = 10, 0.15 * T, 0.75 * T
    for t in range(1, T):
        if t < tw:
            want = 0.0
        elif shape == "exp":
            want = R * (1 - math.exp(-(t - tw) / tau))
        elif shape == "cubic":
            want = R * (1 - (1 - min(1.0, (t - tw) / (tend - tw))) ** 3)
        else:
            want = R
        assert got[t - 1] == pytest.approx(want, rel=1e-12, abs=1e-15), t
    assert got[-1] == R  # snapped exactly
    if shape == "exp":
        assert got[-2] < R and R - got[-2] < 0.002 * R  # within 0.2% before the snap


def test_oscillating_loss_slows_the_ramp_and_never_decreases():
    T = 300
    flat = ramp(SparsitySchedule(0.5, "exp", total_steps=T), T)
    wobble = [2.0 + (1.5 if t % 2 else -1.5) for t in range(T)]
    shaky_sched = SparsitySchedule(0.5, "exp", total_steps=T)
    shaky = ramp(shaky_sched, T, wobble)
    mid = T // 3
    assert shaky[mid] < 0.7 * flat[mid]
    assert all(a <= b for a, b in zip(shaky, shaky[1:]))
    assert shaky[-1] == 0.5
    window = wobble[-50:]
    mean = sum(window) / 50
    sd = math.sqrt(sum((x - mean) ** 2 for x in window) / 50)
    alpha = SparsitySchedule.alpha_of(window)
    assert alpha == pytest.approx(1 / (1 + sd / mean)) and alpha < 1


def test_instability_pauses_growth_but_keeps_reached_sparsity():
    T = 100
    s = SparsitySchedule(0.4, "exp", total_steps=T, stability_window=5)
    losses = [2.0] * 40 + [2.0 + (3.0 if t % 2 else -1.9) for t in range(59)] + [2.0]
    got = ramp(s, T, losses)
    assert got[45] == got[40] > 0  # alpha * R_base fell below the sparsity in force: it stays
    assert got[-1] == 0.4


def test_stability_off_and_prune_interval():
    s = SparsitySchedule(0.3, "exp", total_steps=100, prune_interval=7, stability=False)
    assert [t for t in range(1, 101) if s.is_pruning_step(t)] == list(range(5, 101, 7))
    assert s.final_prune_step == 96
    got = ramp(s, 100, [2.0 + 1.9 * (-1) ** t for t in range(100)])
    assert got[95] == 0.3 and got[94] < 0.3  # snap on the last pruning step


@pytest.mark.parametrize("kwargs,match", [
    (dict(target=0.3, shape="linear"), "schedule"),
    (dict(target=0.3, shape="exp"), "total_steps"),
    (dict(target=0.3, shape="cubic", warmup_steps=3, tau=5.0), "total_steps"),
    (dict(target=0.3, shape="exp", total_steps=0), "total_steps"),
    (dict(target=0.3, shape="exp", total_steps=10, prune_interval=0), "prune_interval"),
    (dict(target=0.3, shape="exp", total_steps=10, tau=-1.0), "tau"),
    (dict(target=0.3, shape="exp", total_steps=10, stability_window=1), "stability_window"),
])
def test_bad_schedules_are_refused(kwargs, match):
    target, shape = kwargs.pop("target"), kwargs.pop("shape")
    with pytest.raises(ValueError, match=match):
        SparsitySchedule(target, shape, **kwargs)


def test_without_total_steps_exp_runs_on_explicit_warmup_and_tau():
    s = SparsitySchedule(0.3, "exp", warmup_steps=0, tau=10.0)
    got = ramp(s, 100)
    assert got[-1] == pytest.approx(0.3 * (1 - math.exp(-100 / 10)))


def test_ramp_end_moves_where_the_cubic_ramp_reaches_the_target():
    T = 100
    early = SparsitySchedule(0.5, "cubic", total_steps=T, ramp_end=0.4, stability=False)
    late = SparsitySchedule(0.5, "cubic", total_steps=T, stability=False)
    assert early.base(40) == 0.5 and early.base(39) < 0.5
    assert late.base(75) == 0.5 and late.base(74) < 0.5 and late.base(40) < early.base(40)
    with pytest.raises(ValueError, match="ramp_end must be in"):
        SparsitySchedule(0.5, "cubic", total_steps=T, ramp_end=0.0)
