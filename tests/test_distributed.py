"""AGIP under DDP and FSDP2 (torchrun, 2 processes, gloo on CPU tensors) equals one process
on the same global batches: theta at every step, the masks bit for bit, the weights
(docs/algorithm.md §6; tests/dist_worker.py says how the reference is built)."""
import os
import subprocess
import sys

import pytest
import torch

import agip

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_worker  # noqa: E402

RUNS = ["fsdp:cpp:fisher:resume:full", "fsdp:reference:taylor", "ddp:reference:fisher", "ddp:cpp:taylor:bucket"]


def torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # cwd the checkout's root, where a user runs the README's torchrun command: `-m agip.cli`
    # puts it on sys.path, so this checkout's agip is the one imported
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=os.path.dirname(HERE))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-8000:]  # the workers' progress and stacks
    return res


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "runs.pt")
    torchrun(os.path.join(HERE, "dist_worker.py"), out, *RUNS)
    return os.path.dirname(out), torch.load(out)


@pytest.mark.integration
@pytest.mark.parametrize("spec", RUNS)
def test_two_ranks_equal_one_process(distributed, spec):
    _, backend, saliency, *_ = spec.split(":")
    got = distributed[1][spec]
    weights, masks, thetas = dist_worker.reference(backend, saliency)
    assert got["thetas"] == thetas  # every step's exact global threshold
    assert all(t == thetas for t in got["thetas_every_rank"])  # on every rank
    assert any(t > 0 for t in thetas)  # pruning happened
    assert masks.keys() == got["masks"].keys()
    for name in masks:
        assert torch.equal(got["masks"][name], masks[name]), name
    for name in weights:
        torch.testing.assert_close(got["weights"][name], weights[name], rtol=0, atol=0)
    rep = got["report"]
    # DDP's gradient_as_bucket_view=True points .grad at DDP's buckets: AGIP copies them back
    # each step (counted); the default setting and FSDP2 write straight into AGIP's buffer
    assert (rep["rebound_grads"] > 0) == ("bucket" in spec), rep["rebound_grads"]
    assert rep["n_prunable"] == sum(m.numel() for m in masks.values())
    assert rep["n_pruned"] == sum(int((~m).sum()) for m in masks.values()) == int(0.5 * rep["n_prunable"])


def test_process_group_without_init_is_a_clear_error():
    model = dist_worker.build_model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        agip.AGIP(agip.param_groups(model), total_steps=10, process_group=object())


def test_parameters_on_two_devices_are_refused():
    model = dist_worker.build_model()
    model.lm_head = torch.nn.Linear(32, 64, bias=False, device="meta")  # untied, on another device
    with pytest.raises(ValueError, match="one device per process"):
        agip.AGIP(agip.param_groups(model), total_steps=10)


def test_sharded_state_of_another_world_size_is_refused():
    model = dist_worker.build_model()
    opt = agip.AGIP(agip.param_groups(model), total_steps=10)
    sd = opt.state_dict()
    sd["agip"].update(world_size=2, sharded=True)
    with pytest.raises(ValueError, match="nproc_per_node 2"):
        opt.load_state_dict(sd)


@pytest.mark.integration
def test_full_checkpoint_from_shards_loads_in_one_process(distributed):
    """save_full gathers FSDP2's shards: one checkpoint that `agip eval` reads."""
    from agip import checkpoint

    folder, runs = distributed
    got = runs["fsdp:cpp:fisher:resume:full"]
    path = os.path.join(folder, "full-fsdp")
    assert checkpoint.is_checkpoint(path)
    from safetensors.torch import load_file
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(path)
    params = dict(model.named_parameters())
    for name, w in got["weights"].items():
        assert torch.equal(params[name].detach(), w), name
    masks = load_file(os.path.join(path, "masks.safetensors"))
    assert masks.keys() == got["masks"].keys()
    for name, m in masks.items():
        assert torch.equal(m, got["masks"][name])
        assert torch.all(params[name].detach()[~m] == 0)


@pytest.mark.integration
@pytest.mark.parametrize("fsdp,distill", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["fsdp", "ddp", "fsdp-distill", "ddp-distill"])
def test_finetune_under_torchrun(gpt2_dir, corpus_dir, tmp_path, capsys, fsdp, distill):
    """`agip finetune` with 2 processes: rank 0 writes one report and one whole checkpoint,
    which `agip eval` in one process measures to the same perplexity (the ranks split the
    evaluation windows and sum their log-likelihoods). With distillation every rank holds the
    teacher (DDP) or its shards (FSDP2)."""
    import json

    from agip.cli import main

    out = tmp_path / "run"
    res = torchrun("-m", "agip.cli", "finetune", "--model", gpt2_dir, "--dataset", corpus_dir, "--steps", "4",
                   "--batch-size", "2", "--block-size", "32", "--eval-seq-len", "64", "--eval-max-tokens", "448",
                   "--target-sparsity", "0.5", "--out", str(out), "--no-progress", *(["--fsdp"] if fsdp else []),
                   *(["--distill-kl", "1", "--distill-hidden", "1"] if distill else []))
    assert res.stdout.count("perplexity on") == 1  # rank 0 speaks
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity_prunable"] == 0.5
    assert report["train_tokens"] == 4 * 2 * 2 * 32  # steps x ranks x batch x block
    assert report["config"]["distill_kl"] == (1.0 if distill else 0.0)
    # 7 windows over 2 ranks: one rank runs a window more, scoring nothing of it
    assert main(["eval", str(out / "checkpoint"), "--dataset", corpus_dir, "--seq-len", "64", "--max-tokens", "448",
                 "--no-progress"]) == 0
    assert f"{report['ppl_after']['ppl']:.3f}" in capsys.readouterr().out


def test_fsdp_needs_several_processes(gpt2_dir, corpus_dir, tmp_path):
    from agip.train import FinetuneConfig, finetune

    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        finetune(FinetuneConfig(model=gpt2_dir, dataset=corpus_dir, fsdp=True, out=str(tmp_path)))
    with pytest.raises(ValueError, match="--fsdp runs --method agip or adamw"):
        finetune(FinetuneConfig(model=gpt2_dir, dataset=corpus_dir, fsdp=True, method="wanda", out=str(tmp_path)))


@pytest.mark.integration
def test_trainer_under_accelerate_ddp(tmp_path):
    """transformers.Trainer (accelerate's DDP, 2 processes): both ranks see the mean loss
    over both ranks' tokens and keep identical weights and masks, pruned to the target."""
    out = str(tmp_path / "hf")
    torchrun(os.path.join(HERE, "hf_ddp_worker.py"), out)
    r0, r1 = torch.load(out + ".0"), torch.load(out + ".1")
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 6
    # E_1 is the mean cross-entropy over both ranks' tokens (it was half of it: each rank's
    # loss divided by both ranks' num_items_in_batch)
    assert r0["losses"][0] == pytest.approx(r0["first_loss"], rel=1e-5)
    assert r0["masks"].keys() == r1["masks"].keys()
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name])
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    assert r0["report"]["sparsity_prunable"] == pytest.approx(0.4, abs=1e-3)
