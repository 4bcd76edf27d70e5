"""OBS pruning (docs/algorithm.md §2.6): the column sweep, the inputs' second moment, AGIP's
own SparseGPT one-shot, the one-shot start (--init) and compensate='obs' inside AGIP."""
import copy

import pytest
import torch

import agip
from agip import baselines, obs
from agip.train import FinetuneConfig, finetune
from conftest import TinyLM, batch, train


def _problem(rows=6, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    return torch.randn(rows, cols, generator=g), x.t() @ x


def _dense_obs(w, h, prune):
    """min (w' - w) H (w' - w)^T per row with w'_S = 0, solved directly (float64)."""
    hinv, out = torch.linalg.inv(h.double()), w.double().clone()
    for i in range(w.shape[0]):
        s = prune[i].nonzero().squeeze(1)
        out[i] -= hinv[:, s] @ torch.linalg.solve(hinv[s][:, s], w[i, s].double())
    return out


def test_sweep_equals_a_dense_obs_solve_when_the_pruned_entries_come_first():
    w, h = _problem()
    prune = torch.zeros(w.shape, dtype=torch.bool)
    prune[:, :5] = True  # every pruned entry precedes every kept one: the one-pass sweep is exact
    new, cut = obs.sweep(w, h, prune, damp=0.0, block=8)
    exact = _dense_obs(w, h, prune)
    assert torch.equal(cut, prune) and bool((new[prune] == 0).all())
    torch.testing.assert_close(new.double(), exact, rtol=1e-4, atol=1e-4)
    assert obs.output_error(w, new, h) < 0.5 * obs.output_error(w, w.masked_fill(prune, 0), h)


def test_sweep_lowers_the_output_error_of_any_mask_and_stays_above_the_optimum():
    w, h = _problem(seed=1)
    prune = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    new, _ = obs.sweep(w, h, prune, damp=0.0, block=4)
    plain = obs.output_error(w, w.masked_fill(prune, 0), h)
    best = obs.output_error(w, _dense_obs(w, h, prune).float(), h)
    assert best * (1 - 1e-4) <= obs.output_error(w, new, h) < plain


def test_with_identity_inputs_the_sweep_is_plain_magnitude_pruning():
    w, _ = _problem(seed=3)
    eye = torch.eye(w.shape[1])
    new, cut = obs.sweep(w, eye, nm=(2, 4), block=8)
    groups = w.abs().reshape(-1, 4)
    want = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1, largest=False).indices, True)
    assert torch.equal(cut, want.reshape(w.shape))
    assert torch.equal(new, w.masked_fill(cut, 0))  # no compensation: H has no off-diagonal
    new, cut = obs.sweep(w, eye, ratio=0.5, block=16)
    assert int(cut.sum()) == w.numel() // 2 and torch.equal(new, w.masked_fill(cut, 0))
    assert float(w.abs()[cut].max()) <= float(w.abs()[~cut].min())


def test_sweep_checks_its_input():
    w, h = _problem()
    with pytest.raises(ValueError, match="inputs, inputs"):
        obs.sweep(w, h[:3])
    with pytest.raises(ValueError, match="bool"):
        obs.sweep(w, h, torch.zeros(w.shape))
    with pytest.raises(ValueError, match="divisible"):
        obs.sweep(w[:, :15], h[:15, :15], nm=(2, 4))


def test_input_moments_share_one_h_per_input_and_add_up_its_tokens(tiny):
    opt = agip.AGIP(agip.param_groups(tiny), target_sparsity=0.5, total_steps=4)
    modules = obs.prunable_modules(tiny, opt)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o: seen.setdefault(mod, []).append(a[0].detach())) for m in modules]
    moments = obs.InputMoments(modules)
    for t in range(2):
        tiny(batch(t))
    moments.remove()
    for h in hooks:
        h.remove()
    for m in modules:
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in seen[m]])
        torch.testing.assert_close(moments.of(m), x.t() @ x, rtol=1e-5, atol=1e-4)
    assert len(moments.h) == len(modules)  # TinyLM: no two layers read the same tensor


def test_input_moments_group_q_k_v_of_a_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    opt = agip.AGIP(agip.param_groups(model), target_sparsity=0.5, total_steps=4)
    moments = obs.InputMoments(obs.prunable_modules(model, opt))
    model(torch.randint(0, 64, (2, 8)))
    moments.remove()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert moments.of(attn.q_proj) is moments.of(attn.k_proj) is moments.of(attn.v_proj)
    assert moments.of(mlp.gate_proj) is moments.of(mlp.up_proj)
    assert moments.of(attn.o_proj) is not moments.of(attn.q_proj)
    assert len(moments.h) == 4  # attention in, o_proj in, MLP in, down_proj in


def _calibration(n=4):
    return [batch(100 + i, shape=(4, 12)) for i in range(n)]


def test_sparsegpt_one_shot_is_24_and_changes_the_first_layer_least():
    errors = {}
    for name in ("sparsegpt", "wanda", "magnitude"):
        model = TinyLM(d=32)
        first = model.layers[0].q_proj  # its inputs do not depend on any pruned layer
        dense = first.weight.detach().clone()
        opt = agip.AGIP(agip.param_groups(model), target_sparsity=0.5, total_steps=4, sparsity_pattern="2:4")
        moments = obs.InputMoments([first])
        with torch.no_grad():
            for x in _calibration():
                model(x)
        moments.remove()
        if name == "sparsegpt":
            masks = obs.sparsegpt(model, opt, 0.5, _calibration(), "2:4")
        elif name == "wanda":
            masks = baselines.wanda_masks(model, opt, 0.5, _calibration(), "2:4")
        else:
            masks = baselines.magnitude_masks(opt, 0.5, "2:4")
        opt.apply_masks(masks)
        for n, p in zip(opt.param_groups[0]["param_names"], opt.param_groups[0]["params"]):
            assert bool((p.detach().reshape(-1, 4) != 0).sum(1).le(2).all()), n
        errors[name] = obs.output_error(dense, first.weight.detach(), moments.of(first))
    assert errors["sparsegpt"] < 0.8 * min(errors["wanda"], errors["magnitude"])


def test_sparsegpt_handles_gpt2_conv1d_and_unstructured(gpt2_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    opt = agip.AGIP(agip.param_groups(model), target_sparsity=0.5, total_steps=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = obs.sparsegpt(model, opt, 0.5, [torch.randint(0, 1000, (2, 16)) for _ in range(3)])
    for name, keep in masks.items():
        p = dict(model.named_parameters())[name]
        assert abs(float((~keep).float().mean()) - 0.5) < 0.02, name
        assert bool((p[~keep] == 0).all())
        assert not torch.equal(p[keep], before[name][keep]), f"{name}: the kept weights did not move"


def test_init_wanda_with_fixed_masks_is_wanda_plus_ft(gpt2_dir, corpus_dir, tmp_path):
    common = dict(model=gpt2_dir, dataset=corpus_dir, steps=4, target_sparsity=0.5, sparsity_pattern="2:4",
                  eval_max_tokens=256, progress=False, calibration_blocks=8, block_size=32, lr=1e-3)
    a = finetune(FinetuneConfig(out=str(tmp_path / "a"), method="agip", init="wanda", **common))
    b = finetune(FinetuneConfig(out=str(tmp_path / "b"), method="wanda", **common))
    assert a["ppl_pruned"]["ppl"] == b["ppl_pruned"]["ppl"]
    assert a["ppl_after"]["ppl"] == b["ppl_after"]["ppl"]  # AGIP's update with a fixed mask: the same
    assert a["sparsity_prunable"] == b["sparsity_prunable"] == 0.5


def test_init_sparsegpt_under_decay_mode_leaves_the_masks_open(gpt2_dir, corpus_dir, tmp_path):
    rep = finetune(FinetuneConfig(model=gpt2_dir, dataset=corpus_dir, out=str(tmp_path), steps=4,
                                  target_sparsity=0.5, sparsity_pattern="2:4", nm_mode="decay", init="sparsegpt",
                                  ramp_end=0.5, eval_max_tokens=256, progress=False, calibration_blocks=8,
                                  block_size=32))
    assert rep["ppl_pruned"] is not None and rep["sparsity_prunable"] == 0.5
    assert rep["history"][0]["sparsity_prunable"] == 0.0  # masks open until the ramp ends (§2.5b)


@pytest.mark.parametrize("kw, match", [(dict(init="obs"), "--init must be one of"),
                                       (dict(init="wanda", method="wanda"), "is for --method agip"),
                                       (dict(init="wanda", target_sparsity=0.0), "target > 0"),
                                       (dict(compensate="obs"), "N:M sparsity_pattern"),
                                       (dict(compensate="obs", method="wanda", sparsity_pattern="2:4",
                                             target_sparsity=0.5), "--compensate is for --method agip")])
def test_harness_refuses_init_and_compensate_where_they_do_not_apply(kw, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kw).check()


def _compensated(backend="reference", compensate="obs", identity=False, steps=6):
    model = TinyLM(d=32)
    opt = agip.AGIP(agip.param_groups(model), lr=1e-2, target_sparsity=0.5, total_steps=steps, warmup_steps=1,
                    ramp_end=0.7, sparsity_pattern="2:4", compensate=compensate, backend=backend, ta_gamma=0.0)
    if compensate == "obs":
        opt.track_inputs(model)
        if identity:  # H = I: compensation must change nothing
            comp = opt._selection.compensation
            comp.moments.of = lambda module: torch.eye(module.weight.shape[1])
    train(model, opt, steps)
    return model, opt


def test_compensation_with_identity_inputs_changes_nothing():
    a, _ = _compensated(identity=True)
    b, _ = _compensated(compensate="none")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_compensation_moves_the_kept_weights_keeps_24_and_releases_its_hooks():
    a, opt = _compensated()
    b, _ = _compensated(compensate="none")
    comp = opt._selection.compensation
    assert comp.released and not comp.moments.h and comp.seconds > 0
    assert opt.sparsity_report()["sparsity_prunable"] == 0.5
    moved = False
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.dim() == 2 and n != "embed.weight" and n != "lm_head.weight":
            assert bool((p.detach().reshape(-1, 4) != 0).sum(1).le(2).all()), n
            moved |= not torch.equal(p, q)
    assert moved


@pytest.mark.parametrize("backend", ["cpp"])
def test_compensation_gives_the_same_masks_on_every_backend(backend):
    pytest.importorskip("ninja")
    (a, oa), (b, ob) = _compensated("reference"), _compensated(backend)
    for p, q in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"]):
        assert torch.equal(oa.state[p]["mask"], ob.state[q]["mask"])  # the masks bit for bit
    for (n, p), q in zip(a.named_parameters(), b.parameters()):  # the updates' last bits differ (FMA)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=n)  # (measured: 1.9e-5 at most)


def test_compensation_needs_track_inputs():
    model = TinyLM(d=32)
    opt = agip.AGIP(agip.param_groups(model), target_sparsity=0.5, total_steps=4, warmup_steps=1,
                    sparsity_pattern="2:4", compensate="obs", ta_gamma=0.0)
    with pytest.raises(RuntimeError, match="track_inputs"):
        train(model, opt, 3)
    with pytest.raises(ValueError, match="compensate='obs'"):
        agip.AGIP(agip.param_groups(copy.deepcopy(model)), target_sparsity=0.5, total_steps=4).track_inputs(model)


def test_a_one_shot_24_mask_survives_the_ramps_first_pruning_steps():
    model = TinyLM(d=32)
    opt = agip.AGIP(agip.param_groups(model), lr=1e-4, target_sparsity=0.5, total_steps=40, warmup_steps=2,
                    sparsity_pattern="2:4", ta_gamma=0.0)
    opt.apply_masks(baselines.magnitude_masks(opt, 0.5, "2:4"))
    masks = {n: m.clone() for n, m in ((n, opt.state[p]["mask"]) for n, p in
                                        zip(opt.param_groups[0]["param_names"], opt.param_groups[0]["params"]))}
    for t in range(6):  # k = 0 on the first pruning step (R_t = 0), then a few groups
        train(model, opt, 1, start=t)
        assert opt.sparsity_report()["sparsity_prunable"] == 0.5, t
    for n, p in zip(opt.param_groups[0]["param_names"], opt.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["mask"], masks[n]), n
