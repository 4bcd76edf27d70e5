"""Hugging Face ``transformers.Trainer`` integration.

``Trainer`` calls ``optimizer.step()`` without arguments, but AGIP needs the loss (the
terminal-attractor term and the stability factor). :func:`attach` registers a forward
hook on the model that hands every training-mode loss to
:meth:`agip.AGIP.record_loss`; the next ``step()`` uses their mean over the step's
tokens (also where ``Trainer`` divided each by the whole step's ``num_items_in_batch``)::

    model = AutoModelForCausalLM.from_pretrained(...)
    opt = agip.AGIP(agip.param_groups(model), lr=5e-5, target_sparsity=0.3, total_steps=T)
    agip.hf.attach(model, opt)
    args = TrainingArguments(..., max_steps=T, max_grad_norm=0.0)  # AGIP clips (docs/algorithm.md §1.3)
    Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, scheduler)).train()

Set ``max_grad_norm=0.0`` in ``TrainingArguments``: AGIP clips the gradient itself, and
the TA term and G^2 then see the raw gradient. ``Trainer``'s ``zero_grad`` sets the
gradients to None; AGIP copies the fresh ones back into its flat buffer each step
(counted in ``sparsity_report()["rebound_grads"]``).

:func:`distill` makes a ``Trainer`` train on :class:`agip.distill.DistillLoss` (a frozen
teacher's KL and SquareHead terms beside the cross-entropy; docs/algorithm.md §7)::

    loss = agip.distill.DistillLoss(agip.distill.load_teacher("start", model), kl=1.0, hidden=1.0)
    trainer = Trainer(model=model, ...)
    agip.hf.distill(trainer, loss)
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .distill import IGNORE_INDEX


# the optimizer each attached model records its loss on: agip.hf.distill's fused pass calls
# the model without labels (no loss for the hook to see) and records its CE here instead
_ATTACHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class AttachHandle:
    """What :func:`attach` returns: ``remove()`` detaches the hook (as torch's handles)."""

    def __init__(self, model, hook_handle):
        self._model, self._hook = weakref.ref(model), hook_handle

    def remove(self) -> None:
        self._hook.remove()
        model = self._model()
        if model is not None:
            _ATTACHED.pop(model, None)


def loss_tokens(model, kwargs) -> Optional[int]:
    """How many tokens a transformers model's loss sums over in this forward call: the
    labels that are not -100, shifted by one for a causal LM's loss (or ``shift_labels``
    as given); None without labels."""
    shifted = kwargs.get("shift_labels")
    if shifted is not None:
        return int((shifted != IGNORE_INDEX).sum())
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor):
        return None
    config = getattr(model, "config", None)
    loss_fn = getattr(model, "loss_function", None)  # transformers' models: the loss forward calls
    causal = not getattr(config, "is_encoder_decoder", False) and \
        getattr(loss_fn, "__name__", "ForCausalLMLoss") == "ForCausalLMLoss"
    return int(((labels[..., 1:] if causal else labels) != IGNORE_INDEX).sum())


def attach(model, optimizer):
    """Record the model's training loss on ``optimizer`` after every forward pass.

    Returns a handle (``handle.remove()`` detaches it). Forward passes in eval mode, or
    without labels (no ``loss`` in the output), record nothing; under :func:`distill`'s
    fused pass the cross-entropy it computes is recorded instead.
    """
    if not hasattr(optimizer, "record_loss"):
        raise TypeError(f"attach needs an agip.AGIP or agip.TAAdamW optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach needs the model (a torch.nn.Module), got {type(model).__name__}")

    def hook(module, args, kwargs, output):
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not (module.training and loss is not None):
            return
        items = kwargs.get("num_items_in_batch")
        tokens = loss_tokens(module, kwargs) if items is not None else None
        if tokens is None:
            optimizer.record_loss(loss)
        elif tokens > 0:
            # Trainer passed num_items_in_batch (gradient accumulation, several ranks): the
            # loss is this micro-batch's summed loss over the whole step's count (of every
            # rank, with average_tokens_across_devices), not a mean of its own; back to its
            # own mean, weighted by its tokens: E_t is then the step's mean over its tokens
            optimizer.record_loss(float(loss.detach()) * float(items) / tokens, tokens=tokens)
        # (no counted token: the micro-batch adds nothing to the step's mean; recording its
        # 0 without a count would have mixed with the counted ones, which record_loss refuses)

    _ATTACHED[model] = optimizer
    return AttachHandle(model, model.register_forward_hook(hook, with_kwargs=True))


def distill(trainer, loss):
    """Replace ``trainer.compute_loss`` (a ``transformers.Trainer``) by the distillation loss
    ``loss`` (an :class:`agip.distill.DistillLoss`; docs/algorithm.md §7): the cross-entropy
    of the batch's ``labels`` weighted by ``loss.ce``, plus the teacher's terms. With CE and
    KL both on (``loss.fuses``) they come from one chunked pass over the logits, the model
    called without labels (its own loss would make an fp32 copy of them; ``fuse_ce=False``
    keeps the model's own CE). The teacher follows the batch to its device. With
    :func:`attach`, AGIP's E_t is the cross-entropy (the model's own, or the fused pass's),
    not the total. The loss is a mean over each micro-batch's tokens: ``Trainer`` divides it
    by the gradient-accumulation steps (``trainer.model_accepts_loss_kwargs`` is set False)."""
    from .distill import DistillLoss

    if not isinstance(loss, DistillLoss):
        raise TypeError(f"distill needs an agip.distill.DistillLoss, got {type(loss).__name__}")
    if not callable(getattr(trainer, "compute_loss", None)):
        raise TypeError(f"distill needs a transformers.Trainer, got {type(trainer).__name__}")

    def unwrap(model):
        accelerator = getattr(trainer, "accelerator", None)
        return accelerator.unwrap_model(model) if accelerator is not None else getattr(model, "module", model)

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if loss.ce > 0 and "labels" not in inputs:
            raise ValueError("agip.hf.distill: the batch has no 'labels', which the cross-entropy term needs "
                             "(a causal LM's collator sets labels = input_ids), or build the loss with ce=0")
        fused = loss.fuses
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"} if fused else inputs
        student = model(**model_inputs, output_hidden_states=loss.hidden > 0)
        ids = inputs["input_ids"]
        loss.teacher.to(ids.device)
        teacher = loss.teacher_out(ids, attention_mask=inputs.get("attention_mask"))
        total = loss.loss(student, teacher, labels=inputs["labels"] if fused else None)
        if fused and model.training:  # the hook of attach saw no loss: hand it this CE
            optimizer = _ATTACHED.get(unwrap(model))
            if optimizer is not None:
                optimizer.record_loss(loss.last["ce"])
        return (total, student) if return_outputs else total

    trainer.compute_loss = compute_loss
    # a per-micro-batch mean (num_items_in_batch is not used): let Trainer divide by the
    # accumulation steps, as it does for a model that takes no loss kwargs
    trainer.model_accepts_loss_kwargs = False
    return trainer
