"""Hugging Face ``transformers.Trainer`` integration.

``Trainer`` calls ``optimizer.step()`` without arguments, but AGIP needs the loss (the
terminal-attractor term and the stability factor). :func:`attach` registers a forward
hook on the model that hands every training-mode loss to
:meth:`agip.AGIP.record_loss`; the next ``step()`` uses their mean::

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


def attach(model, optimizer):
    """Record the model's training loss on ``optimizer`` after every forward pass.

    Returns the hook handle (``handle.remove()`` detaches it). Forward passes in eval
    mode, or without labels (no ``loss`` in the output), record nothing.
    """
    if not hasattr(optimizer, "record_loss"):
        raise TypeError(f"attach needs an agip.AGIP or agip.TAAdamW optimizer, got {type(optimizer).__name__}")

    def hook(module, args, output):
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and loss is not None:
            optimizer.record_loss(loss)

    return model.register_forward_hook(hook)


def distill(trainer, loss):
    """Replace ``trainer.compute_loss`` (a ``transformers.Trainer``) by the distillation loss
    ``loss`` (an :class:`agip.distill.DistillLoss`; docs/algorithm.md §7): the model's own
    cross-entropy (from the batch's ``labels``) weighted by ``loss.ce``, plus the teacher's
    terms. The teacher follows the batch to its device. With :func:`attach`, AGIP's E_t is
    the cross-entropy the model returns (the hook sees the model's output, not the total)."""
    from .distill import DistillLoss

    if not isinstance(loss, DistillLoss):
        raise TypeError(f"distill needs an agip.distill.DistillLoss, got {type(loss).__name__}")
    if not callable(getattr(trainer, "compute_loss", None)):
        raise TypeError(f"distill needs a transformers.Trainer, got {type(trainer).__name__}")

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if loss.ce > 0 and "labels" not in inputs:
            raise ValueError("agip.hf.distill: the batch has no 'labels', which the cross-entropy term needs "
                             "(a causal LM's collator sets labels = input_ids), or build the loss with ce=0")
        student = model(**inputs, output_hidden_states=loss.hidden > 0)
        ids = inputs["input_ids"]
        loss.teacher.to(ids.device)
        teacher = loss.teacher_out(ids, attention_mask=inputs.get("attention_mask"))
        total = loss.loss(student, teacher)  # the model computed its own CE (labels in the batch)
        return (total, student) if return_outputs else total

    trainer.compute_loss = compute_loss
    return trainer
