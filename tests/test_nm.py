"""N:M semi-structured sparsity (docs/algorithm.md §2.5): the pattern holds in every group,
the schedule ramps the share of pruned groups, every backend finds the same masks, and bad
settings fail before any step."""
import pytest
import torch

import agip
from agip import nm
from backend_cases import MAX_ULPS, sync_optimizers, ulps
from conftest import TinyLM, batch, train

STEPS = 10


LR = 1e-2


def make(backend="reference", pattern="2:4", saliency="fisher", model=None, **kw):
    model = model or TinyLM()
    args = dict(lr=LR, target_sparsity=0.5, total_steps=STEPS, warmup_steps=1, schedule="cubic",
                saliency=saliency, sparsity_pattern=pattern, backend=backend)
    args.update(kw)
    return model, agip.AGIP(agip.param_groups(model), **args)


def groups_of(mask: torch.Tensor, input_dim: int, m: int) -> torch.Tensor:
    return mask.movedim(input_dim, -1).reshape(-1, m)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_every_group_has_n_of_m_pruned_at_the_target(pattern):
    n, m = nm.parse(pattern)
    model, opt = make(pattern=pattern, target_sparsity=n / m)
    train(model, opt, STEPS)
    rep = opt.sparsity_report()
    assert rep["sparsity_prunable"] == n / m
    for g in opt.param_groups:
        for p, dim in zip(g["params"], g.get("input_dims", [])):
            kept = groups_of(opt.state[p]["mask"], dim, m).sum(dim=1)
            assert torch.all(kept == m - n)
            assert torch.all(groups_of(p.detach(), dim, m).ne(0).sum(dim=1) == m - n)  # the weights too


def test_the_schedule_ramps_the_share_of_pruned_groups():
    model, opt = make(target_sparsity=0.5)
    total = nm.groups_total(opt._flat, 4)
    shares, previous = [], None
    for t in range(STEPS):
        train(model, opt, 1, start=t)
        rep = opt.sparsity_report()
        masks = torch.cat([st["mask"].reshape(-1) for st in opt.state.values() if "mask" in st])
        if previous is not None:  # a pruned group stays pruned: the masks only lose entries
            assert not torch.any(masks & ~previous), t
        previous = masks.clone()
        k = nm.groups_to_prune(rep["scheduled_sparsity"], 2, 4, total)
        assert rep["n_pruned"] == 2 * k  # exactly k groups, no ties on these random weights
        for g in opt.param_groups:  # a group is whole or 2:4, never in between
            for p, dim in zip(g["params"], g.get("input_dims", [])):
                kept = groups_of(opt.state[p]["mask"], dim, 4).sum(dim=1)
                assert torch.all((kept == 2) | (kept == 4))
        shares.append(k / total)
    assert shares == sorted(shares) and 0 < shares[1] < 1 and shares[-1] == 1.0
    assert opt.sparsity_report()["theta"] is not None


def test_conv1d_groups_run_along_its_first_dimension():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=37,
                                                                 n_positions=16))
    opt = agip.AGIP(agip.param_groups(model), lr=1e-2, target_sparsity=0.5, total_steps=3, warmup_steps=0,
                    sparsity_pattern="2:4", backend="reference")
    for t in range(3):
        x = batch(t)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    g = opt.param_groups[0]
    assert g["input_dims"] == [0] * len(g["params"])  # Conv1D stores (in, out)
    for p in g["params"]:
        assert torch.all(groups_of(opt.state[p]["mask"], 0, 4).sum(dim=1) == 2)


@pytest.mark.parametrize("backend,mode", [("cpp", "fixed"), ("triton", "fixed"), ("cpp", "decay"), ("triton", "decay")])
def test_backends_find_the_same_masks(backend, mode, monkeypatch):
    module = pytest.importorskip(f"agip.backends.{backend}", reason=f"the {backend} backend is not available")
    if backend == "triton":
        monkeypatch.setattr(module, "block", 64)
    # masks are this test's subject (the update's rounding with TA: tests/test_backends_optimizer.py)
    ref_model, ref_opt = make(saliency_ema=0.5, nm_mode=mode)
    model, opt = make(backend, saliency_ema=0.5, nm_mode=mode)
    for t in range(STEPS):
        sync_optimizers(ref_model, ref_opt, model, opt)
        before = [p.detach().clone() for p in ref_model.parameters()]
        for mdl in (ref_model, model):
            loss = mdl(batch(t))
            loss.backward()
        # the same gradient for both: two copies' backward passes may round differently
        # (seen with one thread), and the optimizers are this test's subject
        for a, b in zip(ref_model.parameters(), model.parameters()):
            b.grad.copy_(a.grad)
        for o in (ref_opt, opt):
            o.step(loss=loss)
            o.zero_grad()
        r_ref, r = ref_opt.sparsity_report(), opt.sparsity_report()
        assert r["theta"] == r_ref["theta"] and r["layer_density"] == r_ref["layer_density"], t
        for a, b, old in zip(ref_model.parameters(), model.parameters(), before):
            assert torch.equal(a == 0, b == 0), t
            # ulps of the operands: the Adam term's are of size lr (its normalised step is
            # about 1), and where m's lerp cancels (seen with one thread, a weight of 1e-4
            # and lr 1e-2) its rounding is relative to them, not to the small result
            operands = torch.maximum(old.abs(), torch.full_like(old, LR))
            assert ulps(a.detach() - old, b.detach() - old, operands) <= MAX_ULPS, t
    assert ref_opt.sparsity_report()["sparsity_prunable"] == 0.5


@pytest.mark.parametrize("kw,match", [
    (dict(pattern="4:4"), "need 1 <= N < M"),
    (dict(pattern="2-4"), "must be 'unstructured' or 'N:M'"),
    (dict(pattern="2:4", target_sparsity=0.6), "prunes at most 2/4"),
    (dict(pattern="2:4", regrow_fraction=0.1), "regrowth"),
    (dict(pattern="2:32", target_sparsity=0.05), "not divisible by 32"),  # TinyLM's inputs are 16 and 32 wide
    (dict(pattern="2:4", nm_mode="sometimes"), "nm_mode must be one of"),
    (dict(pattern="unstructured", nm_mode="decay"), "is for an N:M sparsity_pattern"),
    (dict(pattern="2:4", nm_mode="decay", nm_decay=0.0), "nm_decay must be in"),
    (dict(pattern="2:4", nm_input_power=-0.5), "nm_input_power must be in"),
    (dict(pattern="unstructured", nm_input_power=0.5), "nm_input_power=0.5 is for an N:M"),
])
def test_bad_settings_fail_before_any_step(kw, match):
    pattern = kw.pop("pattern")
    with pytest.raises(ValueError, match=match):
        make(pattern=pattern, **kw)


def test_eval_semi_structured_says_why_not_in_one_line(gpt2_dir, corpus_dir, capsys):
    from agip.cli import main

    assert main(["eval", gpt2_dir, "--dataset", corpus_dir, "--seq-len", "64", "--max-tokens", "256",
                 "--semi-structured", "--no-progress"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        lines = [ln for ln in out.splitlines() if ln.startswith("--semi-structured")]
        assert len(lines) == 1 and "compute capability >= 8.0" in lines[0]


def test_is_24_recognises_the_pattern():
    w = torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]])
    assert nm.is_24(w)
    assert not nm.is_24(torch.ones(1, 8))
    assert not nm.is_24(torch.ones(1, 6))


def test_decay_mode_decays_the_chosen_weights_lets_them_come_back_and_cuts_them_at_the_end():
    """nm_mode='decay' (algorithm.md §2.5b) against the same optimizer without pruning, both
    stepped from the same state: before the end of the ramp nothing is zero and the two differ
    exactly on N of every M entries, which are w * (1 - nm_decay * R_t / R_target); a chosen
    weight that grows is not chosen again; the step that reaches the target cuts them."""
    model, opt = make(nm_mode="decay", nm_decay=0.5)
    plain_model, plain = make(target_sparsity=0.0, sparsity_pattern="unstructured")
    dims = [d for g in opt.param_groups for d in g.get("input_dims", [])]
    prunable = [p for g in opt.param_groups if g["prune"] for p in g["params"]]
    plain_prunable = [p for g in plain.param_groups if g["prune"] for p in g["params"]]
    revived = None
    for t in range(STEPS):
        sync_optimizers(model, opt, plain_model, plain)
        for mdl, o in ((model, opt), (plain_model, plain)):
            loss = mdl(batch(t))
            loss.backward()
            o.step(loss=loss)
            o.zero_grad()
        ratio = opt.sparsity_report()["scheduled_sparsity"]
        if ratio >= 0.5:  # the end of the ramp: a 2:4 model, masks and weights
            for p, dim in zip(prunable, dims):
                assert torch.all(groups_of(opt.state[p]["mask"], dim, 4).sum(dim=1) == 2), t
                assert torch.all(groups_of(p.detach(), dim, 4).ne(0).sum(dim=1) == 2), t
            assert opt.sparsity_report()["sparsity_prunable"] == 0.5
            break
        assert opt.sparsity_report()["sparsity_prunable"] == 0.0, t  # nothing cut yet
        decay = 0.5 * ratio / 0.5
        for p, q, dim in zip(prunable, plain_prunable, dims):
            chosen = p.detach() != q.detach()
            if t >= 1:  # every group has exactly 2 decayed entries, decayed by exactly 1 - decay
                assert torch.all(groups_of(chosen, dim, 4).sum(dim=1) == 2), t
                assert torch.equal(p.detach()[chosen], q.detach()[chosen] * (1.0 - decay)), t
        if revived is not None:  # the weight made large is not chosen (decayed) any more
            p, idx = revived
            q = plain_prunable[prunable.index(p)]
            assert p.detach().reshape(-1)[idx] == q.detach().reshape(-1)[idx], t
        if t == 2:  # make one chosen weight the largest of its group: the masks may change
            p, q = prunable[0], plain_prunable[0]
            idx = int(torch.nonzero((p.detach() != q.detach()).reshape(-1))[0])
            with torch.no_grad():
                p.view(-1)[idx] = 10.0
            revived = (p, idx)
    else:
        raise AssertionError("the ramp never reached the target")
    assert revived is not None


@pytest.mark.parametrize("mode", ["fixed", "decay"])
def test_a_settled_2_4_model_skips_the_selection_and_changes_nothing(mode, monkeypatch):
    """Once every group has its N entries pruned and the step asks for all groups, the
    selection is skipped: the same weights, masks and theta as running it, step by step."""
    runs = {}
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(nm, "settled", lambda flat, n, m: False)
        model, opt = make(nm_mode=mode, total_steps=8)
        thetas = []
        for t in range(12):  # the ramp ends at 0.75 * 8 = 6: six settled steps
            train(model, opt, 1, start=t)
            thetas.append(opt.sparsity_report()["theta"])
        runs[skip] = ([p.detach().clone() for p in model.parameters()], thetas)
    (w1, th1), (w0, th0) = runs[True], runs[False]
    assert th1 == th0 and all(torch.equal(a, b) for a, b in zip(w1, w0))
    assert th1[-1] == 0.0


def test_settled_needs_exactly_n_pruned_in_every_group():
    model, opt = make(total_steps=4)
    assert not nm.settled(opt._flat, 2, 4)
    train(model, opt, 6)
    assert nm.settled(opt._flat, 2, 4)
    b, s = next(iter(opt._flat.prunable_slots()))
    g = b.mask[s.start : s.start + s.numel].view(s.shape).movedim(s.input_dim, -1)
    first = g.reshape(-1, 4)[0]
    first[first.nonzero()[0]] = False  # a third entry pruned in one group: not settled any more
    assert not nm.settled(opt._flat, 2, 4)


# --- N:M scores times the inputs' norms (algorithm.md §2.5c) ------------------------------
def prunable_of(opt):
    return [(p, d) for g in opt.param_groups if g["prune"] for p, d in zip(g["params"], g["input_dims"])]


def norms_of(opt, fill):
    """One norm vector per prunable weight, ``fill(j)`` at input j."""
    return {p: torch.tensor([float(fill(j)) for j in range(p.shape[d])]) for p, d in prunable_of(opt)}


@pytest.mark.parametrize("mode", ["fixed", "decay"])
def test_input_norms_that_are_equal_leave_the_choice_alone(mode):
    """Norms of 4 everywhere, q = 1/2: every score times 2 (exact in fp32), so the very same
    weights, masks and theta as without norms."""
    runs = []
    for power in (0.0, 0.5):
        model, opt = make(nm_mode=mode, nm_input_power=power)
        if power:
            opt.set_input_norms(norms_of(opt, lambda j: 4.0))
        thetas = []
        for t in range(STEPS):
            train(model, opt, 1, start=t)
            thetas.append(opt.sparsity_report()["theta"])
        runs.append(([p.detach().clone() for p in model.parameters()], thetas))
    (w0, th0), (w1, th1) = runs
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert th1 == [t * 2 if t and t > 0 else t for t in th0]  # theta is a scaled group cost


@pytest.mark.parametrize("mode", ["fixed", "decay"])
def test_input_norms_decide_within_each_group(mode):
    """Inputs 0 and 1 of every 4 with norm 1e-6, inputs 2 and 3 with 1e6: at q = 1/2 their
    scores are 1e6 times apart, so the 2 pruned entries of every group are inputs 0 and 1
    (without the norms the scores choose otherwise)."""
    model, opt = make(nm_mode=mode, nm_input_power=0.5)
    opt.set_input_norms(norms_of(opt, lambda j: 1e-6 if j % 4 < 2 else 1e6))
    train(model, opt, STEPS)
    for p, dim in prunable_of(opt):
        kept = groups_of(opt.state[p]["mask"], dim, 4)
        assert torch.all(~kept[:, :2]) and torch.all(kept[:, 2:])
    model, opt = make(nm_mode=mode)
    train(model, opt, STEPS)
    assert not all(torch.all(~groups_of(opt.state[p]["mask"], d, 4)[:, :2]) for p, d in prunable_of(opt))


def test_input_norms_resume_from_the_state_dict_bit_identically():
    """The norms travel in the state dict: a fresh optimizer loaded from it continues as the
    original does, without set_input_norms."""
    model, opt = make(nm_mode="decay", nm_input_power=0.5)
    opt.set_input_norms(norms_of(opt, lambda j: 1.0 + (j * 7919 % 13)))
    train(model, opt, 3)
    sd = opt.state_dict()
    twin, twin_opt = make(nm_mode="decay", nm_input_power=0.5, model=TinyLM())
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(sd)
    train(model, opt, STEPS - 3, start=3)
    train(twin, twin_opt, STEPS - 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert len(sd["agip"]["input_norms"]) == len(prunable_of(opt))
    _, unstructured = make(pattern="unstructured")
    with pytest.raises(ValueError, match="holds input norms"):
        unstructured.load_state_dict(sd)


def test_input_norms_fail_clearly():
    model, opt = make(nm_mode="decay", nm_input_power=0.5)
    with pytest.raises(RuntimeError, match="call opt.set_input_norms"):
        train(model, opt, 3)  # the first pruning step
    _, opt = make(nm_mode="decay", nm_input_power=0.5)
    good = norms_of(opt, lambda j: 1.0)
    p, _ = prunable_of(opt)[0]
    with pytest.raises(ValueError, match="input size"):
        opt.set_input_norms({**good, p: torch.ones(3)})
    with pytest.raises(ValueError, match="negative or non-finite"):
        opt.set_input_norms({**good, p: -good[p]})
    with pytest.raises(ValueError, match="pass one for every prunable parameter"):
        opt.set_input_norms({p: good[p]})
    with pytest.raises(ValueError, match="not a prunable parameter"):
        opt.set_input_norms({**good, "nope": good[p]})
    _, plain = make()
    with pytest.raises(ValueError, match="nm_input_power > 0"):
        plain.set_input_norms(norms_of(plain, lambda j: 1.0))


def test_input_norms_of_the_calibration_batches_are_wandas():
    """agip.baselines.input_norms: ||X_j|| of each prunable layer's inputs, by hand for one."""
    from agip import baselines

    model, opt = make(nm_mode="decay", nm_input_power=0.5)
    cal = [batch(0), batch(1)]
    norms = baselines.input_norms(model, opt, cal)
    layer = model.layers[0]
    seen = []
    h = layer.q_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().reshape(-1, 16)))
    with torch.no_grad():
        for x in cal:
            model(x)
    h.remove()
    assert torch.allclose(norms[layer.q_proj.weight], torch.cat(seen).pow(2).sum(0).sqrt(), rtol=1e-6)
    assert set(norms) == {p for p, _ in prunable_of(opt)}
    with pytest.raises(ValueError, match="at least one calibration batch"):
        baselines.input_norms(model, opt, [])
