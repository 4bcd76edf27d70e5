"""Must show 8: bad input raises a clear error before any state changes; a NaN loss or a
non-finite gradient skips the step and changes nothing but skipped_steps (docs/algorithm.md §1.1)."""
import math

import pytest
import torch
from torch import nn

import agip
from conftest import TinyLM, batch, train


def make(**kw):
    model = TinyLM()
    return model, agip.AGIP(agip.param_groups(model), **{"lr": 1e-2, "total_steps": 20, "preset": "thesis", **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(target_sparsity=-0.1), "target_sparsity must be in"),
    (dict(target_sparsity=1.0), "target_sparsity must be in"),
    (dict(ta_beta=0.0), "ta_beta must be in"),
    (dict(ta_beta=1.0), "ta_beta must be in"),
    (dict(lr=-1e-3), "lr must be"),
    (dict(eps=-1.0), "eps must be"),
    (dict(weight_decay=-0.1), "weight_decay must be"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(ta_gamma=-1.0), "ta_gamma"),
    (dict(regrow_fraction=1.5), "regrow_fraction"),
    (dict(saliency_ema=1.0), "saliency_ema"),
    (dict(schedule="linear"), "schedule must be one of"),
    (dict(backend="cuda-magic"), "backend must be"),
    (dict(total_steps=None), "total_steps"),
])
def test_bad_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_bad_params_raise():
    a = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="more than one"):
        agip.AGIP([{"params": [a], "prune": True}, {"params": [a]}], total_steps=10)
    with pytest.raises(ValueError, match="floating-point"):
        agip.AGIP([torch.zeros(3, dtype=torch.long)], target_sparsity=0.0)
    with pytest.raises(ValueError, match="dense parameters"):
        agip.AGIP([nn.Parameter(torch.eye(3).to_sparse())], target_sparsity=0.0)
    with pytest.raises(ValueError, match="requires_grad=False"):
        agip.AGIP([torch.zeros(3)], target_sparsity=0.0)
    with pytest.raises(ValueError, match="no param group has prune=True"):
        agip.AGIP([a], total_steps=10)
    with pytest.raises(ValueError, match="'prune' must be True or False"):
        agip.AGIP([{"params": [a], "prune": "yes"}], total_steps=10)
    with pytest.raises(ValueError, match="lr must be .* \\(param group 0\\)"):
        agip.AGIP([{"params": [a], "lr": -1.0}], target_sparsity=0.0)
    with pytest.raises(ValueError, match="one device"):
        agip.AGIP([a, nn.Parameter(torch.zeros(2, device="meta"))], target_sparsity=0.0)
    opt = agip.AGIP([a], target_sparsity=0.0, ta_gamma=0.0)
    with pytest.raises(RuntimeError, match="new optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = agip.TAAdamW(emb.parameters(), ta_gamma=0.0)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()  # autograd added the sparse grad into the bound dense buffer: fine
    emb.weight.grad = None  # now autograd stores a sparse tensor as the grad
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()


def test_missing_and_negative_loss():
    model, opt = make()
    model(batch(0)).backward()
    with pytest.raises(TypeError, match=r"opt.step\(loss=loss\)"):
        opt.step()
    with pytest.raises(TypeError, match="pass the loss as"):
        opt.step(torch.tensor(1.0))
    with pytest.raises(ValueError, match="loss >= 0"):
        opt.step(loss=-0.5)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(3))
    assert opt.step_count == 0
    # without TA and stability no loss is needed; a negative loss is fine
    _, quiet = make(ta_gamma=0.0, stability=False)
    quiet.step()
    quiet.step(loss=-1.0)
    assert quiet.step_count == 2


def snapshot(model, opt):
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [v.clone() for st in opt.state.values() for v in st.values()]
    rep = opt.sparsity_report()
    rep.pop("skipped_steps")
    return tensors, rep, opt.schedule.state_dict()


@pytest.mark.parametrize("poison", ["nan_loss", "inf_loss", "inf_grad", "nan_grad"])
def test_non_finite_step_changes_nothing_but_skipped_steps(poison):
    model, opt = make(target_sparsity=0.5, warmup_steps=0, saliency_ema=0.5, regrow_fraction=0.1)
    train(model, opt, 4)
    loss = model(batch(4))
    loss.backward()
    before = snapshot(model, opt)
    if poison.endswith("grad"):
        model.layers[0].q_proj.weight.grad[0, 0] = math.inf if poison == "inf_grad" else math.nan
    value = {"nan_loss": math.nan, "inf_loss": math.inf}.get(poison, loss.item())
    with pytest.warns(RuntimeWarning, match="skipped step 5"):
        opt.step(loss=value)
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]
    assert opt.skipped_steps == 1 and opt.step_count == 4


def test_parameters_copied_to_an_equal_device_are_bound_again():
    """transformers.Trainer under torchrun calls model.to("cpu:0"), which copies CPU
    parameters: AGIP copies them back into its buffer (counted) and trains on."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), total_steps=4, backend="reference")
    model.to(torch.device("cpu", 0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 1)
    rep = opt.sparsity_report()
    assert rep["rebound_params"] == len(before)
    for n, p in model.named_parameters():  # bound again, and the step moved them
        assert opt._flat.buckets[0].w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        assert not torch.equal(p.detach(), before[n])


def test_parameters_cast_after_the_optimizer_are_a_clear_error():
    model = TinyLM()
    opt = agip.AGIP(agip.param_groups(model), total_steps=4, backend="reference")
    model.double()
    with pytest.raises(RuntimeError, match="create the optimizer after model.to"):
        train(model, opt, 1)


@pytest.mark.parametrize("options,match", [
    (dict(sparsity_pattern="4:2"), "need 1 <= N < M"),
    (dict(eval_ood="nope"), "unknown dataset 'nope'"),
    (dict(sparsity_pattern="2:4", regrow_fraction=0.1), "regrowth"),
    (dict(sparsity_pattern="2:4", target_sparsity=0.7), "prunes at most 2/4"),
    (dict(dataset="no/such/folder"), "unknown dataset"),
    (dict(backend="cuda"), "--backend must be"),
])
def test_finetune_refuses_bad_options_before_loading_anything(options, match, monkeypatch):
    from agip import train

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(train, "load_model", loaded)
    monkeypatch.setattr(train, "load_corpus", loaded)
    with pytest.raises(ValueError, match=match):
        train.finetune(train.FinetuneConfig(**options))
