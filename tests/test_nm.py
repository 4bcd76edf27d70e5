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
