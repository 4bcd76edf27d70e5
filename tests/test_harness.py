"""The fine-tuning harness (issue 5): a tiny GPT-2 with the real GPT-2 tokenizer on a
small text; the perplexity protocol against a hand computation; resume bit for bit;
report files; clear errors for bad arguments."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from agip import checkpoint  # noqa: E402
from agip.cli import main  # noqa: E402
from agip.evaluate import perplexity  # noqa: E402
from agip.train import FinetuneConfig, finetune  # noqa: E402

def config(gpt2_dir, corpus_dir, out, **kw):
    base = dict(model=gpt2_dir, dataset=corpus_dir, out=str(out), steps=6, batch_size=2, block_size=32,
                lr=1e-3, target_sparsity=0.5, eval_seq_len=64, eval_max_tokens=None, progress=False, bf16=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_prunes_reports_and_saves(gpt2_dir, corpus_dir, tmp_path):
    report = finetune(config(gpt2_dir, corpus_dir, tmp_path / "run"))
    assert report["sparsity_prunable"] == pytest.approx(0.5, abs=1e-4)
    assert 0 < report["sparsity_all"] < report["sparsity_prunable"]
    assert report["ppl_after"]["seq_len"] == 64 and report["ppl_after"]["stride"] == 64
    assert math.isfinite(report["ppl_before"]["ppl"]) and math.isfinite(report["ppl_after"]["ppl"])
    assert [h["step"] for h in report["history"]] == list(range(1, 7))
    for name in ("report.json", "report.md", "loss.png", "sparsity.png", "density.png"):
        assert (tmp_path / "run" / name).is_file(), name
    for png in ("loss.png", "sparsity.png", "density.png"):
        assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "perplexity" in (tmp_path / "run" / "report.md").read_text()
    # the checkpoint holds the pruned model: zeros where the masks say so
    from safetensors.torch import load_file

    ck = tmp_path / "run" / "checkpoint"
    weights, masks = load_file(str(ck / "model.safetensors")), load_file(str(ck / "masks.safetensors"))
    assert masks and all(not weights[n][~m].any() for n, m in masks.items())
    frac = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert frac == pytest.approx(0.5, abs=1e-4)


def test_eval_cli_measures_a_checkpoint(gpt2_dir, corpus_dir, tmp_path, capsys):
    report = finetune(config(gpt2_dir, corpus_dir, tmp_path / "run", steps=3))
    assert main(["eval", str(tmp_path / "run" / "checkpoint"), "--dataset", corpus_dir, "--seq-len", "64",
                 "--max-tokens", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{report['ppl_after']['ppl']:.3f}" in out and "L=64" in out


def test_eval_cli_measures_a_plain_save_pretrained_folder(gpt2_dir, corpus_dir, capsys):
    # gpt2_dir is a save_pretrained folder (model + tokenizer, no AGIP training state)
    assert not checkpoint.is_checkpoint(gpt2_dir)
    assert main(["eval", gpt2_dir, "--dataset", corpus_dir, "--seq-len", "64", "--max-tokens", "512",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "perplexity on" in out and "L=64" in out and "zero weights: 0 of" in out


def test_resume_after_a_crash_is_bit_identical(gpt2_dir, corpus_dir, tmp_path, monkeypatch):
    straight = finetune(config(gpt2_dir, corpus_dir, tmp_path / "a", steps=6, checkpoint_every=3,
                               regrow_fraction=0.1))
    real_save, calls = checkpoint.save, []

    def crash_after_first_save(*a, **kw):
        real_save(*a, **kw)
        calls.append(1)
        raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")

    monkeypatch.setattr(checkpoint, "save", crash_after_first_save)
    cfg = config(gpt2_dir, corpus_dir, tmp_path / "b", steps=6, checkpoint_every=3, regrow_fraction=0.1)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert json.load(open(tmp_path / "b" / "checkpoint" / "trainer_state.json"))["step"] == 3
    cfg.resume = True
    resumed = finetune(cfg)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["ppl_after"] == straight["ppl_after"]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class Killer:
    """Counts the calls a checkpoint save makes to everything that writes, renames, links,
    flushes or removes, and raises KeyboardInterrupt (a kill) at call number ``at``."""

    def __init__(self, monkeypatch, model, tok, at=None):
        import safetensors.torch

        self.calls, self.at = [], at
        targets = [(os, "replace"), (os, "symlink"), (os, "fsync"), (os, "remove"), (shutil, "rmtree"),
                   (torch, "save"), (json, "dump"), (safetensors.torch, "save_file"),
                   (type(model.config), "save_pretrained"), (type(tok), "save_pretrained")]
        if getattr(model, "generation_config", None) is not None:  # patched on the classes: an instance
            targets.append((type(model.generation_config), "save_pretrained"))  # attribute would be saved
        for obj, name in targets:
            monkeypatch.setattr(obj, name, self.wrap(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}",
                                                     getattr(obj, name)))

    def wrap(self, label, fn):
        def call(*a, **kw):
            self.calls.append(label)
            if self.at is not None and len(self.calls) == self.at:
                raise KeyboardInterrupt(f"killed at call {self.at}: {label}")
            return fn(*a, **kw)

        return call


def test_a_kill_at_any_step_of_a_save_leaves_a_complete_checkpoint(gpt2_dir, corpus_dir, tmp_path):
    finetune(config(gpt2_dir, corpus_dir, tmp_path / "run", steps=2))
    ck = tmp_path / "run" / "checkpoint"
    model, tok, _ = checkpoint.load_model(str(ck))
    files = ("model.safetensors", "config.json", "trainer_state.json")

    def snapshot():
        return {f: (ck / f).read_bytes() for f in files}

    old = snapshot()
    with pytest.MonkeyPatch.context() as mp:  # count the calls of one whole save
        killer = Killer(mp, model, tok)
        checkpoint.save(str(ck), model, tok, state={"step": 99})
    new = snapshot()
    assert json.loads(new["trainer_state.json"])["step"] == 99 and len(killer.calls) >= 8
    for at in range(1, len(killer.calls) + 1):
        for state, want in ((2, old), (99, new)):  # start each try from a known checkpoint
            checkpoint.save(str(ck), model, tok, state={"step": state})
            start = snapshot()
            with pytest.MonkeyPatch.context() as mp:
                Killer(mp, model, tok, at=at)
                try:
                    checkpoint.save(str(ck), model, tok, state={"step": 1000 + at})
                except KeyboardInterrupt:
                    pass
            assert checkpoint.is_checkpoint(str(ck)), (at, killer.calls[at - 1])
            now = snapshot()
            step = json.loads(now["trainer_state.json"])["step"]
            assert step in (state, 1000 + at), (at, killer.calls[at - 1], step)
            if step == state:
                assert now == start, (at, killer.calls[at - 1])  # the old one, intact
            checkpoint.load_model(str(ck))  # and it loads
    # a save after all those kills works and leaves no debris beside the checkpoint
    checkpoint.save(str(ck), model, tok, state={"step": 7})
    assert sorted(os.listdir(tmp_path / "run")).count("checkpoint") == 1
    assert [p for p in os.listdir(tmp_path / "run") if p.startswith(".")] == [os.readlink(ck)]


class ToyLM(nn.Module):
    """logits at window position j for input token x: T[x] + P[j] (depends on the window)."""

    def __init__(self, vocab=11, max_len=16):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.T = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.P = nn.Parameter(torch.randn(max_len, vocab, generator=g))

    def forward(self, x):
        return SimpleNamespace(logits=self.T[x] + self.P[: x.shape[1]])


def hand_nll(model, ids, L, stride):
    """The HF perplexity guide, written out with plain loops."""
    ids = ids.tolist()
    logp = lambda ctx, j, tok: float(torch.log_softmax(model.T[ctx] + model.P[j], -1)[tok])  # noqa: E731
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + L, len(ids))
        trg = end - prev_end
        for pos in range(max(begin + 1, end - trg), end):  # scored positions
            nll -= logp(ids[pos - 1], pos - 1 - begin, ids[pos])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("n,L,stride", [(50, 8, 8), (53, 8, 8), (9, 8, 8), (50, 8, 3), (40, 16, 5)])
def test_perplexity_matches_a_hand_computation(n, L, stride):
    model = ToyLM()
    ids = torch.randint(0, 11, (n,), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        res = perplexity(model, ids, L, stride)
        nll, count = hand_nll(model, ids, L, stride)
    assert res["scored_tokens"] == count
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    if stride == L:  # every token but the first of each window
        assert count == n - math.ceil(n / L)


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_bad_arguments_fail_with_clear_messages(gpt2_dir, corpus_dir, tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (conftest.py): an unknown model name fails at once, as without a network
    base = ["finetune", "--dataset", corpus_dir, "--out", str(tmp_path / "x"), "--steps", "1", "--no-progress",
            "--block-size", "32", "--eval-seq-len", "64"]
    code, err = run_cli(base + ["--model", "no-such-model-anywhere"], capsys)
    assert code == 2 and "could not load" in err and "smollm2-135m" in err
    code, err = run_cli(base + ["--model", gpt2_dir, "--target-sparsity", "1.5"], capsys)
    assert code == 2 and "--target-sparsity must be in [0, 1)" in err
    code, err = run_cli(base + ["--model", gpt2_dir, "--eval-seq-len", "4096"], capsys)
    assert code == 2 and "context is 128 tokens" in err
    empty = tmp_path / "empty"
    shutil.copytree(corpus_dir, empty)
    (empty / "test.txt").write_text("  \n\n ")
    code, err = run_cli(["finetune", "--model", gpt2_dir, "--dataset", str(empty), "--out", str(tmp_path / "y"),
                         "--block-size", "32", "--eval-seq-len", "64", "--no-progress"], capsys)
    assert code == 2 and "test split is empty" in err
    code, err = run_cli(base + ["--model", gpt2_dir, "--dataset", "no-such-corpus"], capsys)
    assert code == 2 and "unknown dataset" in err
    code, err = run_cli(base + ["--model", gpt2_dir, "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err
    code, err = run_cli(["eval", str(tmp_path / "nowhere"), "--dataset", corpus_dir, "--no-progress"], capsys)
    assert code == 2 and "the path does not exist" in err and "checkpoint" in err


@pytest.mark.parametrize("flag", ["--model", "--teacher", "--dataset"])
@pytest.mark.parametrize("path", ["/no/such/folder", "./no-such-folder", "../no-such-folder", "~/no-such-folder"])
def test_a_missing_path_is_called_a_path(gpt2_dir, corpus_dir, tmp_path, capsys, monkeypatch, flag, path):
    """A --model / --teacher / --dataset that is plainly a path and names nothing says so
    (not "could not load the model on the hub"), before any model loads: the teacher's too."""
    import transformers

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    args = {"--model": gpt2_dir, "--dataset": corpus_dir, "--teacher": None}
    args[flag] = path
    argv = ["finetune", "--out", str(tmp_path / "x"), "--steps", "1", "--no-progress", "--block-size", "32"]
    for k, v in args.items():
        if v is not None:
            argv += [k, v]
    if flag == "--teacher":
        argv += ["--distill-kl", "1"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and path in err and ("does not exist" in err), err


def test_bf16_autocast_run_prunes_with_fp32_state(gpt2_dir, corpus_dir, tmp_path):
    report = finetune(config(gpt2_dir, corpus_dir, tmp_path / "bf16", steps=4, bf16=True))
    assert report["sparsity_prunable"] == pytest.approx(0.5, abs=1e-4)
    assert all(math.isfinite(h["loss"]) for h in report["history"]) and report["skipped_steps"] == 0
    assert math.isfinite(report["ppl_after"]["ppl"])


def test_gradient_accumulation_loss_is_the_mean_of_the_micro_batch_losses(gpt2_dir, corpus_dir, tmp_path, monkeypatch):
    import agip.train

    seen, real_load = [], agip.train.load_model

    def load(name, *a, **kw):  # record every training-mode forward loss of the model
        model, tok = real_load(name, *a, **kw)
        model.register_forward_hook(lambda m, args, out: seen.append(float(out.loss)) if m.training else None)
        return model, tok

    monkeypatch.setattr(agip.train, "load_model", load)
    report = finetune(config(gpt2_dir, corpus_dir, tmp_path / "accum", steps=3, grad_accum=2))
    assert len(seen) == 6
    for h, pair in zip(report["history"], zip(seen[0::2], seen[1::2])):
        assert h["loss"] == pytest.approx(sum(pair) / 2, rel=1e-6)  # E_t (algorithm.md §0)


def test_rng_state_round_trip_includes_cuda_when_present():
    from agip.train import get_rng_state, set_rng_state

    state = get_rng_state()
    assert ("cuda" in state) == torch.cuda.is_available()
    a = torch.rand(3)
    b = torch.cuda.FloatTensor(3).uniform_() if torch.cuda.is_available() else None
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    if b is not None:
        assert torch.equal(torch.cuda.FloatTensor(3).uniform_(), b)
    set_rng_state(state["cpu"])  # the CPU-only form older checkpoints hold
    assert torch.equal(torch.rand(3), a)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA device"):
            set_rng_state({"cpu": state["cpu"], "cuda": [torch.zeros(8, dtype=torch.uint8)]})


def test_wikitext_is_joined_like_the_hugging_face_guide(monkeypatch):
    # no network here: a stand-in for datasets.load_dataset with WikiText's shape
    import sys

    from agip.data import join, load_corpus

    lines = {s: [" = Title = \n", "", " Some text .\n", "", " More text .\n"] for s in ("train", "validation", "test")}
    fake = SimpleNamespace(load_dataset=lambda name, config: {s: {"text": v} for s, v in lines.items()})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = load_corpus("wikitext-2-raw-v1")
    assert join(corpus["test"]) == "\n\n".join(lines["test"])  # every line, empty ones too
