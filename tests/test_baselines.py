"""Baselines of the quality study (issue 6): masks and schedules against direct
computations, the harness methods end to end, and benchmarks/quality.py --quick."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import agip
from agip import baselines
import quality  # benchmarks/quality.py (conftest puts benchmarks/ on the path)
from conftest import TinyLM, batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_magnitude_masks_prune_the_globally_smallest():
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), total_steps=10)
    masks = baselines.magnitude_masks(opt, 0.4)
    groups = [g for g in opt.param_groups if g["prune"]]
    mags = torch.cat([p.detach().abs().reshape(-1) for g in groups for p in g["params"]])
    k = math.floor(0.4 * mags.numel())
    theta = float(torch.kthvalue(mags, k).values)
    for g in groups:
        for name, p in zip(g["param_names"], g["params"]):
            assert torch.equal(masks[name], p.detach().abs() > theta)
    assert sum(int((~m).sum()) for m in masks.values()) == k  # random weights: no ties


def test_gmp_ratio_is_zhu_gupta_cubic():
    assert baselines.gmp_ratio(0, 100, 0.5) == 0.0
    assert baselines.gmp_ratio(75, 100, 0.5) == 0.5 and baselines.gmp_ratio(100, 100, 0.5) == 0.5
    assert baselines.gmp_ratio(40, 100, 0.5) == pytest.approx(0.5 * (1 - (1 - 35 / 70) ** 3))


def test_wanda_masks_follow_the_score_per_output_row():
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), total_steps=10)
    calib = [batch(0), batch(1)]
    masks = baselines.wanda_masks(model, opt, 0.5, calib)
    # direct computation for one layer: inputs of up_proj are tanh(q_proj(norm(h)))
    layer = model.layers[0]
    xs = []
    handle = layer.up_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x in calib:
            model(x)
    handle.remove()
    norm = torch.cat(xs).pow(2).sum(0).sqrt()
    score = layer.up_proj.weight.detach().abs() * norm[None, :]
    k = score.shape[1] // 2
    expect = torch.ones_like(score, dtype=torch.bool)
    expect.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    assert torch.equal(masks["layers.0.up_proj.weight"], expect)
    assert all(int((~m).sum(1).unique().numel()) == 1 for m in masks.values())  # the same count in every row


def test_wanda_handles_gpt2_conv1d(gpt2_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    opt = agip.AGIP(agip.param_groups(model), total_steps=10)
    masks = baselines.wanda_masks(model, opt, 0.3, [torch.randint(0, 1000, (2, 16))])
    w = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out); rows of Wanda are the outputs
    m = masks["transformer.h.0.mlp.c_fc.weight"]
    assert m.shape == w.shape
    assert bool(((~m).sum(0) == math.floor(0.3 * w.shape[0])).all())


def _expected_24(score, input_dim):
    """The 2:4 keep mask of one score tensor, the long way: per group of 4 along the input,
    the 2 largest stay (no ties in random weights)."""
    t = score.movedim(input_dim, -1)
    groups = t.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, torch.topk(groups, 2, dim=1).indices, True)
    return keep.reshape(t.shape).movedim(-1, input_dim)


def test_magnitude_and_wanda_24_masks_keep_the_two_largest_scores_of_every_four_inputs():
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), total_steps=10)
    masks = baselines.magnitude_masks(opt, 0.5, "2:4")
    for g in opt.param_groups:
        for name, p, dim in zip(g.get("param_names", []), g["params"], g.get("input_dims", [])):
            assert torch.equal(masks[name], _expected_24(p.detach().abs(), dim)), name
    calib = [batch(0), batch(1)]
    masks = baselines.wanda_masks(model, opt, 0.5, calib, "2:4")
    layer, xs = model.layers[0], []
    handle = layer.up_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x in calib:
            model(x)
    handle.remove()
    score = layer.up_proj.weight.detach().abs() * torch.cat(xs).pow(2).sum(0).sqrt()[None, :]
    assert torch.equal(masks["layers.0.up_proj.weight"], _expected_24(score, 1))
    assert not torch.equal(masks["layers.0.up_proj.weight"], _expected_24(layer.up_proj.weight.detach().abs(), 1))
    with pytest.raises(ValueError, match="--target-sparsity 0.5"):
        baselines.magnitude_masks(opt, 0.3, "2:4")


def test_wanda_24_groups_gpt2_conv1d_along_its_inputs(gpt2_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    opt = agip.AGIP(agip.param_groups(model), total_steps=10)
    masks = baselines.wanda_masks(model, opt, 0.5, [torch.randint(0, 1000, (2, 16))], "2:4")
    m = masks["transformer.h.0.mlp.c_fc.weight"]  # Conv1D: (in, out), the inputs run along dim 0
    assert bool((m.t().reshape(-1, 4).sum(1) == 2).all())


@pytest.mark.parametrize("kw,match", [(dict(method="gmp"), "prunes unstructured only"),
                                       (dict(method="wanda", target_sparsity=0.3), "--target-sparsity 0.5")])
def test_harness_refuses_24_where_a_method_cannot_do_it(kw, match):
    from agip.train import FinetuneConfig

    with pytest.raises(ValueError, match=match):
        FinetuneConfig(sparsity_pattern="2:4", **{"target_sparsity": 0.5, **kw}).check()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_harness_24_baselines_train_a_24_model(method, gpt2_dir, corpus_dir, tmp_path):
    from agip import nm
    from agip.checkpoint import load_model
    from agip.train import FinetuneConfig, finetune

    rep = finetune(FinetuneConfig(model=gpt2_dir, dataset=corpus_dir, out=str(tmp_path), method=method, steps=3,
                                  batch_size=2, block_size=32, lr=1e-3, target_sparsity=0.5, sparsity_pattern="2:4",
                                  eval_seq_len=64, eval_max_tokens=256, progress=False, bf16=False))
    assert rep["sparsity_prunable"] == 0.5
    model = load_model(rep["checkpoint"])[0]
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    assert nm.is_24(w.t())  # Conv1D (in, out): is_24 reads nn.Linear's (out, in)


def test_harness_agip_24_with_input_norms(gpt2_dir, corpus_dir, tmp_path):
    """--nm-input-power: the harness measures the inputs' norms on Wanda's calibration blocks
    and trains a 2:4 model; a baseline refuses the flag."""
    from agip import nm
    from agip.checkpoint import load_model
    from agip.train import FinetuneConfig, finetune

    cfg = dict(model=gpt2_dir, dataset=corpus_dir, out=str(tmp_path), steps=4, batch_size=2, block_size=32, lr=1e-3,
               target_sparsity=0.5, sparsity_pattern="2:4", nm_mode="decay", nm_input_power=0.5, eval_seq_len=64,
               eval_max_tokens=256, progress=False, bf16=False)
    rep = finetune(FinetuneConfig(**cfg))
    assert rep["sparsity_prunable"] == 0.5 and rep["config"]["nm_input_power"] == 0.5
    model = load_model(rep["checkpoint"])[0]
    assert nm.is_24(model.transformer.h[0].mlp.c_fc.weight.detach().t())
    with pytest.raises(ValueError, match="--nm-input-power is for --method agip"):
        FinetuneConfig(**{**cfg, "method": "wanda"}).check()


@pytest.mark.parametrize("method", ["gmp", "magnitude", "wanda", "adamw", "platon"])
def test_harness_methods(method, gpt2_dir, corpus_dir, tmp_path):
    from agip.train import FinetuneConfig, finetune

    rep = finetune(FinetuneConfig(model=gpt2_dir, dataset=corpus_dir, out=str(tmp_path), method=method, steps=10,
                                  batch_size=2, block_size=32, lr=1e-3, target_sparsity=0.5, eval_seq_len=64,
                                  eval_max_tokens=None, progress=False, bf16=False))
    if method == "adamw":
        assert rep["sparsity_prunable"] == 0.0
        return
    assert rep["sparsity_prunable"] == pytest.approx(0.5, abs=0.01)
    assert (rep["ppl_pruned"] is not None) == (method in ("magnitude", "wanda"))
    if method in ("gmp", "platon"):  # the cubic ramp, re-applied during training
        s = [h["sparsity_prunable"] for h in rep["history"]]
        assert s[0] < s[4] < s[-1] and all(a <= b + 1e-9 for a, b in zip(s, s[1:]))
    else:  # one-shot: the mask is fixed from the first step
        assert all(h["sparsity_prunable"] == rep["sparsity_prunable"] for h in rep["history"])


def test_platon_score_is_the_papers_smoothed_taylor():
    # two steps of PLATON's EMAs by hand (Zhang et al. 2022): I_bar = EMA_0.85(|w g|),
    # U_bar = EMA_0.95(|I - I_bar|) with the updated I_bar; S = I_bar * U_bar
    p = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    q = torch.nn.Parameter(torch.tensor([3.0, -1.0, 0.25]))
    opt = agip.AGIP([{"params": [p, q], "prune": True, "param_names": ["p", "q"]}], total_steps=10)
    sc = baselines.PlatonScore()
    i_bar = {n: torch.zeros_like(t) for n, t in (("p", p), ("q", q))}
    u_bar = {n: torch.zeros_like(t) for n, t in (("p", p), ("q", q))}
    for grads in ((torch.tensor([[0.1, 0.2], [-0.4, 1.0]]), torch.tensor([0.5, 0.5, -2.0])),
                  (torch.tensor([[0.3, 0.0], [0.2, 1.0]]), torch.tensor([-0.1, 0.2, 4.0]))):
        p.grad, q.grad = grads[0].clone(), grads[1].clone()
        sc.update(opt)
        for n, t in (("p", p), ("q", q)):
            ipt = (t.detach() * t.grad).abs()
            i_bar[n] = 0.85 * i_bar[n] + 0.15 * ipt
            u_bar[n] = 0.95 * u_bar[n] + 0.05 * (ipt - i_bar[n]).abs()
            assert torch.allclose(sc.i_bar[n], i_bar[n]) and torch.allclose(sc.u_bar[n], u_bar[n])
    scores = torch.cat([(i_bar[n] * u_bar[n]).reshape(-1) for n in ("p", "q")])
    masks = sc.masks(3 / 7)
    kept = torch.cat([masks["p"].reshape(-1), masks["q"].reshape(-1)])
    assert int((~kept).sum()) == 3 and bool((scores[~kept].max() < scores[kept].min()))
    with pytest.raises(ValueError, match="betas"):
        baselines.PlatonScore(beta1=1.0)


@pytest.mark.integration
def test_quality_quick_runs_every_phase_and_resumes(gpt2_dir, corpus_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--quick", "--model", gpt2_dir,
           "--dataset", corpus_dir, "--out", str(tmp_path), "--block-size", "32", "--batch-size", "2",
           "--eval-seq-len", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd + ["--phase", "lr", "select"], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "study-2.json").read_text())
    assert len(data["rows"]) == 3 + 4 and set(data["choices"]) == {"lr", "default"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)  # continues: nm and grid
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count("[lr]") == 0 and res.stdout.count("[select]") == 0  # recorded runs are not redone
    data = json.loads((tmp_path / "study-2.json").read_text())
    rows = data["rows"]
    # the 2:4 candidates (the grid's "default in 2:4" row is one of them, not run twice), 3
    # distillation candidates, then the grid (with 8 distilled rows, PLATON's seeds 1 and 2)
    # and the lr24 phase: the chosen 2:4 mode and Wanda + FT 2:4 at the lrs of LRS_24 that are
    # not the study's (llmcompressor is not installed here: no SparseGPT row)
    n_nm, n_distill = len(quality.NM_CANDIDATES), len(quality.DISTILL_CANDIDATES)
    n_lr24 = 2 * len(set(quality.LRS_24) - {data["choices"]["lr"]})
    n_lr50 = 3 * len(set(quality.LRS_24) - {data["choices"]["lr"]})  # the default, Wanda + FT, PLATON
    n_init = len(quality.INIT_CANDIDATES)  # issue 36's one-shot starts (AGIP's own SparseGPT, Wanda)
    assert len(rows) == 3 + 4 + n_nm + n_distill + 36 + n_lr24 + n_lr50 + n_init
    assert len({r["key"] for r in rows}) == len(rows)
    assert set(data["choices"]) == {"lr", "default", "nm", "distill", "init24"}
    # candidates, 2 baselines, 2 seeds; distillation's candidates, 2 baselines, the dense teacher's row; lr24; init24
    assert sum(1 for r in rows if r.get("sparsity_pattern") == "2:4" or r.get("init")) == \
        n_nm + 2 + 2 + n_distill + 2 + 1 + n_lr24 + n_init
    init24 = [r for r in rows if r["phase"] == "init24"]
    # one-shot starts (with their one-shot perplexity), compensated cuts, and both at once
    assert {r.get("init") for r in init24} == {"sparsegpt", "wanda", None}
    assert all(r["ppl_pruned"] for r in init24 if r.get("init"))
    assert {(r.get("init"), r.get("compensate")) for r in init24} >= {(None, "obs"), ("sparsegpt", "obs")}
    lr24 = [r for r in rows if r["phase"] == "lr24"]
    assert len(lr24) == n_lr24 and {r["lr"] for r in lr24} <= set(quality.LRS_24)
    assert {r["label"] for r in lr24} == ({"Wanda + FT, 2:4", f"AGIP 2:4 ({data['choices']['nm']['label']})"}
                                          if n_lr24 else set())
    lr50 = [r for r in rows if r["phase"] == "lr50"]
    assert len(lr50) == n_lr50 and all(r["target"] == 0.5 and not r.get("sparsity_pattern") for r in lr50)
    assert {r["label"] for r in lr50} == ({"Wanda + FT", f"AGIP default ({data['choices']['default']['label']})",
                                           "PLATON (Ī·Ū, GMP's cubic ramp, masks every step)"} if n_lr50 else set())
    assert sum(1 for r in rows if r.get("distill_kl") or r.get("distill_hidden")) == n_distill + 8
    taught = [r for r in rows if r.get("teacher") == "dense-ft"]
    assert len(taught) == 1 and data["teacher"]["dense-ft"]["ppl_test"] > 0
    assert {r.get("nm_mode") for r in rows if r["phase"] == "nm"} == {None, "decay"}
    # every candidate's input-norm power (§2.5c) reaches its row: the harness records what it ran
    wanted = {f"AGIP candidate: {label}": ov.get("nm_input_power") for label, ov in quality.NM_CANDIDATES}
    assert {r["label"]: r.get("nm_input_power") for r in rows if r["phase"] == "nm"} == wanted
    assert {r["method"] for r in rows} == {"adamw", "gmp", "magnitude", "wanda", "agip", "platon"}
    assert {r["target"] for r in rows} == {0.0, 0.3, 0.5}
    assert all(r["ood_test"] and r["ood_validation"] and r["ppl_validation"] for r in rows)
    assert sum(1 for r in rows if r["seed"] == 2) == 7  # dense, Wanda, the default at 50%, 30%, v_(t-1), 2:4, PLATON
    report = (tmp_path / "study-2.md").read_text()
    assert report.count("\n|") >= 25
    assert ("the lr24 phase" in report) == bool(n_lr24)  # its table, one method per lr, the best marked
    assert ("the lr50 phase" in report) == bool(n_lr50)
    assert (tmp_path / "study-2.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "study-2-density.png").read_bytes()[:4] == b"\x89PNG"  # default next to thesis
    assert (tmp_path / "study-2-bars.png").read_bytes()[:4] == b"\x89PNG"  # every method at the largest target
    leftovers = [p for run in (tmp_path / "runs").iterdir() for p in os.listdir(run) if "checkpoint" in p]
    assert not leftovers  # checkpoints (links and versions) are removed after each run


@pytest.mark.parametrize("steps,events", [(24, 10), (100, 10), (7, 10), (60, 3)])
def test_gmp_reprunes_exactly_gmp_events_times_the_last_at_the_end(monkeypatch, steps, events):
    from types import SimpleNamespace

    from agip import methods

    calls = []
    monkeypatch.setattr(baselines, "magnitude_masks", lambda opt, ratio: calls.append(ratio) or {})
    opt = SimpleNamespace(apply_masks=lambda masks: None)
    cfg = SimpleNamespace(steps=steps, gmp_events=events, target_sparsity=0.5)
    gmp = methods.GMP(cfg)
    for step in range(1, steps + 1):
        gmp.after_step(step, opt)
    assert len(calls) == min(events, steps) and calls[-1] == 0.5
    assert calls == sorted(calls)


def test_sparsegpt_without_llmcompressor_says_what_to_install(gpt2_dir, corpus_dir, tmp_path, capsys):
    import importlib.util

    from agip.cli import main

    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is installed here")
    assert main(["finetune", "--method", "sparsegpt", "--model", gpt2_dir, "--dataset", corpus_dir, "--steps", "1",
                 "--block-size", "32", "--eval-seq-len", "64", "--eval-max-tokens", "128", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert "pip install -e '.[baselines]'" in capsys.readouterr().err


def test_sparsegpt_masks_prune_each_layer_to_the_ratio(gpt2_dir, tmp_path):
    pytest.importorskip("llmcompressor")
    import transformers

    import agip
    from agip import baselines

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    # a model folder with a tokenizer beside it, as the harness loads (llmcompressor loads the tokenizer)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    transformers.AutoTokenizer.from_pretrained(gpt2_dir).save_pretrained(str(tmp_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    opt = agip.AGIP(agip.param_groups(model), total_steps=4, target_sparsity=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = [torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    masks = baselines.sparsegpt_masks(model, opt, 0.5, calib)
    named = dict(model.named_parameters())
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down per block
    for name, m in masks.items():
        assert abs(float((~m).float().mean()) - 0.5) < 0.01, name
        assert not torch.equal(named[name].detach()[m], before[name][m])  # SparseGPT updates what it keeps
    assert torch.equal(named["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # tied head untouched
