"""transformers.Trainer trains with AGIP through agip.hf.attach (issue 5)."""
import math

import pytest
import torch

import agip
import agip.hf

transformers = pytest.importorskip("transformers")


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=101):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_gpt2(dropout=0.1):
    """A 2-layer GPT-2, seed 0 (``dropout=0``: the same forward in every run, for comparisons)."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101,
                                                                n_positions=32, bos_token_id=0, eos_token_id=0,
                                                                resid_pdrop=dropout, embd_pdrop=dropout,
                                                                attn_pdrop=dropout))


def make_trainer(tmp_path, model, opt, T):
    """A CPU Trainer of T steps on Blocks() with AGIP as its optimizer (AGIP clips: max_grad_norm=0)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=T, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Blocks(), optimizers=(opt, sched))


def test_trainer_prunes_with_agip(tmp_path):
    model = tiny_gpt2()
    T = 8
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-3, target_sparsity=0.4, total_steps=T)
    handle = agip.hf.attach(model, opt)
    trainer = make_trainer(tmp_path, model, opt, T)
    result = trainer.train()
    rep = opt.sparsity_report()
    # one E_t a step, the Trainer's train_loss exactly, or L/(L-1) of it where transformers
    # counts GPT-2's tokens unshifted for num_items_in_batch (5.x: its figure is 15/16 of the mean)
    assert len(opt.schedule.losses) == T
    ratio = sum(opt.schedule.losses) / T / result.training_loss
    assert ratio == pytest.approx(16 / 15, rel=1e-5) or ratio == pytest.approx(1.0, rel=1e-5)
    assert opt.step_count == T and rep["skipped_steps"] == 0
    assert rep["sparsity_prunable"] == pytest.approx(0.4, abs=1e-3)
    assert rep["ta_scale"] > 0  # the loss reached the TA term
    handle.remove()
    with torch.no_grad():  # pruned weights stayed zero in the model Trainer trained
        for group in opt.param_groups:
            for p in group["params"]:
                if "mask" in opt.state[p]:
                    assert not p[~opt.state[p]["mask"]].any()


def test_record_loss_averages_micro_batches():
    p = torch.nn.Parameter(torch.ones(3))
    opt = agip.TAAdamW([p], lr=0.1, ta_gamma=1.0)
    p.grad = torch.ones(3)
    for loss in (1.0, 2.0, torch.tensor(3.0)):
        opt.record_loss(loss)
    opt.step()
    assert list(opt.schedule.losses) == [2.0]  # the mean of the three recorded losses
    assert opt.sparsity_report()["ta_scale"] == pytest.approx(
        agip.ta_scale(2.0, 3 * (1 / (3**0.5 + 1e-6)) ** 2, 1.0, 0.5, 1.0, 1.0, 1e-8), rel=1e-5)
    with pytest.raises(TypeError, match="opt.step\\(loss=loss\\)"):
        opt.step()  # the recorded losses were used up
    with pytest.raises(TypeError, match="agip.AGIP"):
        agip.hf.attach(torch.nn.Linear(2, 2), torch.optim.SGD([p], lr=0.1))


def test_trainer_distils_through_agip_hf_distill(tmp_path):
    import agip.distill

    model = tiny_gpt2()
    T = 4
    opt = agip.AGIP(agip.param_groups(model), lr=1e-3, target_sparsity=0.5, total_steps=T)
    loss = agip.distill.DistillLoss(agip.distill.load_teacher("start", model, dtype=torch.float32), ce=1.0, kl=1.0,
                                    hidden=1.0)
    handle = agip.hf.attach(model, opt)
    seen = []  # the student's own loss in training mode: None, CE and KL come from the fused pass
    model.register_forward_hook(lambda m, a, out: seen.append(out.loss) if m.training else None)
    trainer = agip.hf.distill(make_trainer(tmp_path, model, opt, T), loss)
    result = trainer.train()
    assert loss.fuses and len(seen) == T and all(x is None for x in seen)
    # the last step's terms: the pruned student now differs from its start, so KL and SquareHead are on
    assert loss.last["kl"] > 0 and loss.last["hidden"] > 0
    assert loss.last["loss"] == pytest.approx(loss.last["ce"] + loss.last["kl"] + loss.last["hidden"], rel=1e-6)
    assert result.training_loss > 0 and opt.sparsity_report()["sparsity_prunable"] == pytest.approx(0.5, abs=1e-3)
    # AGIP's E_t is the fused pass's cross-entropy (the hook of attach saw no loss), one a step
    assert len(opt.schedule.losses) == T and opt.schedule.losses[-1] == pytest.approx(loss.last["ce"], rel=1e-6)
    handle.remove()
    assert model not in agip.hf._ATTACHED
    with pytest.raises(TypeError, match="DistillLoss"):
        agip.hf.distill(trainer, lambda m, x: 0)


def test_hf_distill_fused_pass_matches_the_models_own_cross_entropy(tmp_path):
    """One Trainer step with CE and KL in one pass equals the step with the model's own CE
    beside the KL (fuse_ce=False): the same terms, the same weights after."""
    import agip.distill

    results = []
    for fuse in (True, False):
        model = tiny_gpt2(dropout=0.0)
        teacher = tiny_gpt2(dropout=0.0)  # the same start: a KL of zero would test nothing, so perturb the teacher
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        loss = agip.distill.DistillLoss(teacher.eval().requires_grad_(False), ce=1.0, kl=1.0, fuse_ce=fuse)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        agip.hf.distill(make_trainer(tmp_path / str(fuse), model, opt, 1), loss).train()
        results.append((dict(loss.last), [p.detach().clone() for p in model.parameters()]))
    (fused, w_fused), (own, w_own) = results
    assert fused["kl"] > 0
    for k in ("ce", "kl", "loss"):
        assert fused[k] == pytest.approx(own[k], rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(w_fused, w_own))


def test_hf_distill_divides_by_gradient_accumulation(tmp_path):
    """4 sequences in one batch and 2 x 2 with gradient accumulation take the same SGD step:
    distill's loss is a per-micro-batch mean, which Trainer must divide by the accumulation
    steps (SGD, unlike Adam, shows it: without that, the second step was twice the first)."""
    import agip.distill

    weights = []
    for batch, accumulate in ((4, 1), (2, 2)):
        model = tiny_gpt2(dropout=0.0)
        loss = agip.distill.DistillLoss(agip.distill.load_teacher("start", model, dtype=torch.float32), ce=1.0,
                                        kl=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(batch)), max_steps=1, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate, max_grad_norm=0.0, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Blocks(), optimizers=(opt, sched))
        agip.hf.distill(trainer, loss).train()
        weights.append([p.detach().clone() for p in model.parameters()])
    start = [p.detach() for p in tiny_gpt2(dropout=0.0).parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(weights[0], start))
    assert moved > 1e-3  # the step did something
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*weights))


def first_step_loss(model):
    """A pre-hook that computes, once, the mean next-token cross-entropy of the first
    training batch the model sees, with the weights it has then (dropout off): E_1's truth."""
    first = {}

    def grab(module, args, kwargs):
        if module.training and "loss" not in first:
            first["loss"] = None  # the forward below runs this hook again
            ids = kwargs["input_ids"]
            with torch.no_grad():
                logits = module(input_ids=ids).logits
            first["loss"] = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                                    ids[:, 1:].flatten()))

    model.register_forward_pre_hook(grab, with_kwargs=True)
    return first


@pytest.mark.parametrize("batch,accumulate", [(4, 1), (2, 2)])
def test_attach_records_the_steps_mean_loss(tmp_path, batch, accumulate):
    """E_t is the mean cross-entropy over the step's tokens, also when Trainer divides each
    micro-batch's loss by the whole step's num_items_in_batch (before: half of it with 2
    micro-batches)."""
    model = tiny_gpt2(dropout=0.0)
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-3, target_sparsity=0.4, total_steps=2)
    agip.hf.attach(model, opt)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Blocks(),
                                   optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)))
    if accumulate == 1:  # one micro-batch: E_1 is its mean
        first = first_step_loss(model)
        trainer.train()
        assert opt.schedule.losses[0] == pytest.approx(first["loss"], rel=1e-5)
    else:  # two micro-batches: E_1 is the start model's mean over both
        seen = []
        model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()) if m.training else None,
                                        with_kwargs=True)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        trainer.train()
        ids = torch.cat(seen[:2])
        check = tiny_gpt2(dropout=0.0)
        check.load_state_dict(start)
        with torch.no_grad():
            want = float(check(input_ids=ids, labels=ids).loss)
        assert opt.schedule.losses[0] == pytest.approx(want, rel=1e-5)
    assert opt.schedule.losses[0] == pytest.approx(math.log(101), rel=0.05)  # an untrained model's CE


def test_record_loss_weighs_by_tokens_and_refuses_a_mix():
    p = torch.nn.Parameter(torch.ones(3))
    opt = agip.TAAdamW([p], lr=0.1, ta_gamma=1.0)
    p.grad = torch.ones(3)
    opt.record_loss(1.0, tokens=1)
    opt.record_loss(4.0, tokens=3)
    opt.step()
    assert list(opt.schedule.losses) == [pytest.approx(3.25)]  # (1 + 12) / 4
    opt.record_loss(1.0, tokens=2)
    with pytest.raises(ValueError, match="not a mix"):
        opt.record_loss(2.0)
    with pytest.raises(ValueError, match="positive int"):
        opt.record_loss(2.0, tokens=0)


def test_attach_skips_a_micro_batch_without_counted_tokens():
    """Under num_items_in_batch, a micro-batch whose labels are all -100 adds nothing to E_t
    (its loss is 0 over 0 tokens) rather than an uncounted 0 that record_loss refuses."""
    model = tiny_gpt2(dropout=0.0)
    opt = agip.AGIP(agip.param_groups(model), preset="thesis", lr=1e-3, target_sparsity=0.4, total_steps=2)
    ids = Blocks().x[:2]
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)  # before attach: not recorded
    agip.hf.attach(model, opt)
    with torch.no_grad():
        a = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(30))
        model(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=torch.tensor(30))
    assert float(a.loss) * 30 / 30 == pytest.approx(want, rel=1e-5)  # 2 x 15 counted tokens: its own mean
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.schedule.losses[-1] == pytest.approx(want, rel=1e-5)
