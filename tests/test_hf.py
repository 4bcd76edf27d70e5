"""transformers.Trainer trains with AGIP through agip.hf.attach (issue 5)."""
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


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101,
                                                                n_positions=32, bos_token_id=0, eos_token_id=0))


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
    # the losses AGIP saw are the Trainer's: their mean is the Trainer's train_loss
    assert len(opt.schedule.losses) == T
    assert sum(opt.schedule.losses) / T == pytest.approx(result.training_loss, rel=1e-5)
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
    trainer = agip.hf.distill(make_trainer(tmp_path, model, opt, T), loss)
    result = trainer.train()
    # the last step's terms: the pruned student now differs from its start, so KL and SquareHead are on
    assert loss.last["kl"] > 0 and loss.last["hidden"] > 0
    assert loss.last["loss"] == pytest.approx(loss.last["ce"] + loss.last["kl"] + loss.last["hidden"], rel=1e-6)
    assert result.training_loss > 0 and opt.sparsity_report()["sparsity_prunable"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(TypeError, match="DistillLoss"):
        agip.hf.distill(trainer, lambda m, x: 0)
