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
