"""Distillation (docs/algorithm.md §7): the chunked KL and SquareHead against direct
computations (values and gradients), the loss object's checks, and the harness with a
teacher: the start model, a dense run's checkpoint, resume bit for bit, bad options."""
import json

import pytest
import torch

from agip import distill

transformers = pytest.importorskip("transformers")

from agip import checkpoint  # noqa: E402
from agip.train import FinetuneConfig, finetune  # noqa: E402


def direct_kl(s, t, T):
    """T² · mean over tokens of KL(softmax(t/T) ‖ softmax(s/T)), in fp64 with torch's own kl_div."""
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), log_target=True,
                                    reduction="sum")
    return kl * T * T / s.shape[0]


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_chunked_kl_and_its_gradient_equal_the_direct_formula(chunk, T):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 7, 50, generator=g) * 3).requires_grad_(True)
    t = torch.randn(2, 7, 50, generator=g) * 3
    loss = distill.kl_div(s, t, T, chunk)
    loss.backward()
    s2 = s.detach().double().requires_grad_(True)
    ref = direct_kl(s2, t, T)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(s.grad.double(), s2.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_gradient_is_bit_identical_for_every_chunk_size(dtype):
    # the chunk size is a speed setting (default_chunk_tokens: 32 on the CPU, 1,024 on CUDA):
    # each row's gradient is computed from that row alone, so training must not change with it
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 11, 97, generator=g) * 4).to(dtype).requires_grad_(True)
    t = (torch.randn(3, 11, 97, generator=g) * 4).to(dtype)
    grads = []
    for chunk in (None, 1, 5, 32, 1024):
        distill.kl_div(s, t, 1.5, chunk).backward()
        grads.append(s.grad.clone())
        s.grad = None
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])
    assert distill.default_chunk_tokens("cpu") == 32 and distill.default_chunk_tokens("cuda") == 1024
    with pytest.raises(ValueError, match="chunk_tokens"):
        distill.kl_div(s, t, 1.0, 0)


def test_kl_in_bf16_keeps_the_logits_dtype_and_is_close():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16).requires_grad_(True)
    t = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    loss = distill.kl_div(s, t, 1.0, chunk_tokens=4)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(direct_kl(s.detach(), t, 1.0)), rel=1e-5)  # fp32 math inside


def test_kl_of_identical_logits_is_zero_and_pushes_nothing():
    s = torch.randn(4, 10, 30).requires_grad_(True)
    loss = distill.kl_div(s, s.detach().clone())
    loss.backward()
    assert abs(float(loss)) < 1e-6 and float(s.grad.abs().max()) < 1e-7


def direct_ce(s, labels):
    """The causal LM's own next-token cross-entropy (transformers' shift), in fp64."""
    v = s.shape[-1]
    return torch.nn.functional.cross_entropy(s.double()[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                             ignore_index=distill.IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ce_kl_in_one_pass_equals_the_models_ce_plus_the_kl(chunk, T):
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(2, 9, 60, generator=g) * 3).requires_grad_(True)
    t = torch.randn(2, 9, 60, generator=g) * 3
    labels = torch.randint(0, 60, (2, 9), generator=g)
    labels[0, 4] = distill.IGNORE_INDEX  # a label without a term: the position before it has no CE
    total, ce, kl = distill.ce_kl(s, t, labels, T, ce=0.7, kl=1.3, chunk_tokens=chunk)
    total.backward()
    s2 = s.detach().double().requires_grad_(True)
    ref_ce, ref_kl = direct_ce(s2, labels), direct_kl(s2, t, T)
    (0.7 * ref_ce + 1.3 * ref_kl).backward()
    assert float(ce) == pytest.approx(float(ref_ce), rel=1e-6) and float(kl) == pytest.approx(float(ref_kl), rel=1e-6)
    assert float(total.detach()) == pytest.approx(0.7 * float(ref_ce) + 1.3 * float(ref_kl), rel=1e-6)
    assert torch.allclose(s.grad.double(), s2.grad, atol=1e-7, rtol=1e-4)
    assert not ce.requires_grad and not kl.requires_grad  # the terms are for the record; the sum trains


def test_ce_kl_gradient_is_bit_identical_for_every_chunk_size_and_refuses_bad_input():
    g = torch.Generator().manual_seed(6)
    s = (torch.randn(3, 11, 97, generator=g) * 4).to(torch.bfloat16).requires_grad_(True)
    t = (torch.randn(3, 11, 97, generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 97, (3, 11), generator=g)
    grads = []
    for chunk in (None, 1, 5, 1024):
        distill.ce_kl(s, t, labels, 1.0, chunk_tokens=chunk)[0].backward()
        grads.append(s.grad.clone())
        s.grad = None
    assert grads[0].dtype == torch.bfloat16 and all(torch.equal(grads[0], gr) for gr in grads[1:])
    with pytest.raises(ValueError, match="no position has a next-token label"):
        distill.ce_kl(s, t, torch.full_like(labels, distill.IGNORE_INDEX))
    with pytest.raises(ValueError, match="labels"):
        distill.ce_kl(s, t, labels[:, :-1])
    with pytest.raises(ValueError, match="ce > 0"):
        distill.ce_kl(s, t, labels, ce=0.0)
    with pytest.raises(ValueError, match="differ"):
        distill.ce_kl(s, t[:, :-1], labels)


def test_distill_loss_fused_and_unfused_agree(gpt2_dir):
    # fuse_ce (the default): CE from the KL's chunks, the model called without labels; False:
    # the model's own CE beside kl_div (the path of the distilled rows recorded before it)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with torch.no_grad():  # a student unlike its teacher, so that the KL pushes
        for p in model.parameters():
            p.mul_(0.8)
    teacher = distill.load_teacher(transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir), dtype=torch.float32)
    x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(4))
    grads, lasts = [], []
    for fuse in (True, False):
        fn = distill.DistillLoss(teacher, ce=0.5, kl=1.0, hidden=1.0, fuse_ce=fuse)
        assert fn.fuses == fuse
        fn(model, x).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        lasts.append(fn.last)
        model.zero_grad()
    assert lasts[0].keys() == lasts[1].keys() == {"ce", "kl", "hidden", "loss"}
    for k in lasts[0]:
        assert lasts[0][k] == pytest.approx(lasts[1][k], rel=1e-5), k
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert not distill.DistillLoss(teacher, ce=1.0, kl=0.0, hidden=1.0).fuses  # no KL: the model's own CE
    with pytest.raises(ValueError, match="no loss for the CE term"):
        distill.DistillLoss(teacher, kl=1.0, fuse_ce=False).loss(model(x), teacher(x))


def test_squarehead_is_the_normalised_mse_averaged_over_blocks():
    g = torch.Generator().manual_seed(2)
    hs = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    ht = [torch.randn(2, 5, 8, generator=g) * (i + 1) for i in range(4)]
    expect = sum(((a - b) ** 2).mean() / (b ** 2).mean() for a, b in zip(hs[1:], ht[1:])) / 3
    assert float(distill.squarehead(hs, ht)) == pytest.approx(float(expect), rel=1e-6)
    with pytest.raises(ValueError, match="depth"):
        distill.squarehead(hs, ht[:3])


def test_distill_loss_combines_the_terms_and_a_copy_teaches_nothing(gpt2_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    fn = distill.DistillLoss(distill.load_teacher("start", model, dtype=torch.float32), ce=0.5, kl=1.0, hidden=2.0)
    loss = fn(model, x)
    ce = float(model(x, labels=x).loss)
    assert fn.last["ce"] == pytest.approx(ce, rel=1e-6)
    assert abs(fn.last["kl"]) < 1e-5 and fn.last["hidden"] < 1e-10  # the start model teaches the start model
    assert float(loss) == pytest.approx(0.5 * ce + fn.last["kl"] + 2 * fn.last["hidden"], rel=1e-6)
    assert not any(p.requires_grad for p in fn.teacher.parameters())
    with torch.no_grad():  # change the student: now both terms are positive
        for p in model.parameters():
            p.mul_(0.5)
    fn(model, x)
    assert fn.last["kl"] > 1e-3 and fn.last["hidden"] > 1e-3


@pytest.mark.parametrize("kw,match", [(dict(ce=-1.0), "ce must be a number >= 0"),
                                       (dict(ce=0.0, kl=0.0), "every weight is 0"),
                                       (dict(kl=1.0, temperature=0.0), "temperature must be > 0")])
def test_distill_loss_refuses_bad_weights(kw, match):
    with pytest.raises(ValueError, match=match):
        distill.DistillLoss(torch.nn.Linear(2, 2), **kw)


def config(gpt2_dir, corpus_dir, out, **kw):
    base = dict(model=gpt2_dir, dataset=corpus_dir, out=str(out), steps=4, batch_size=2, block_size=32,
                lr=1e-3, target_sparsity=0.5, eval_seq_len=64, eval_max_tokens=256, progress=False, bf16=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_harness_distils_from_the_start_model_and_from_a_dense_checkpoint(gpt2_dir, corpus_dir, tmp_path):
    plain = finetune(config(gpt2_dir, corpus_dir, tmp_path / "plain"))
    start = finetune(config(gpt2_dir, corpus_dir, tmp_path / "start", distill_kl=1.0, distill_hidden=1.0))
    # the first step's loss: CE + KL + SquareHead of the unpruned model against itself in bf16:
    # CE and two small terms (bf16 rounding of the teacher)
    assert plain["history"][0]["loss"] < start["history"][0]["loss"] < 1.05 * plain["history"][0]["loss"]
    assert [h["loss"] for h in start["history"][1:]] != [h["loss"] for h in plain["history"][1:]]
    assert start["config"]["distill_kl"] == 1.0 and start["peak_memory_bytes"] > 0
    from agip.train import summary

    assert "distilled from start" in summary(start) and "distilled" not in summary(plain)
    dense = finetune(config(gpt2_dir, corpus_dir, tmp_path / "dense", method="adamw", target_sparsity=0.0))
    ck = dense["checkpoint"]
    assert checkpoint.is_checkpoint(ck)
    taught = finetune(config(gpt2_dir, corpus_dir, tmp_path / "taught", distill_kl=1.0, teacher=ck,
                             method="wanda"))
    assert taught["sparsity_prunable"] == pytest.approx(0.5, abs=0.01)
    rep = json.load(open(tmp_path / "taught" / "report.json"))
    assert rep["config"]["teacher"] == ck


def test_a_resumed_distillation_run_is_bit_identical(gpt2_dir, corpus_dir, tmp_path, monkeypatch):
    import agip.train as train

    kw = dict(steps=4, checkpoint_every=2, distill_kl=1.0, distill_ce=0.5)
    straight = finetune(config(gpt2_dir, corpus_dir, tmp_path / "a", **kw))
    real = train.save_run

    def crash_after_first_save(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")

    monkeypatch.setattr(train, "save_run", crash_after_first_save)
    cfg = config(gpt2_dir, corpus_dir, tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    monkeypatch.setattr(train, "save_run", real)
    cfg.resume = True  # the teacher "start" is loaded afresh, not taken from the pruned checkpoint
    resumed = finetune(cfg)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["ppl_after"] == straight["ppl_after"]


@pytest.mark.parametrize("kw,match", [
    (dict(teacher="start"), "without --distill-kl or --distill-hidden does nothing"),
    (dict(distill_kl=-1.0), "must be >= 0"),
    (dict(distill_kl=1.0, distill_temperature=0.0), "--distill-temperature must be > 0"),
    (dict(distill_ce=0.5), "only scales the loss"),
])
def test_harness_refuses_bad_distillation_options(kw, match, gpt2_dir, corpus_dir, tmp_path):
    with pytest.raises(ValueError, match=match):
        finetune(config(gpt2_dir, corpus_dir, tmp_path, **kw))


def test_a_teacher_with_another_vocabulary_is_refused(gpt2_dir):
    student = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=37))
    with pytest.raises(ValueError, match="vocabulary"):
        distill.check_teacher(other, student)
