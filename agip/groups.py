"""Parameter groups for AGIP: which weights are prunable, which get weight decay.

docs/algorithm.md §0: the prunable set P is the weight matrices of the linear projections
inside the transformer blocks (attention q/k/v/o and the MLP): ``Conv1D.weight`` for
GPT-2, ``nn.Linear.weight`` for Llama-style models. Embeddings, ``lm_head``, norms and
biases are trained but never pruned. docs/algorithm.md §5: biases, norms and embeddings get
no weight decay.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from torch import nn

Patterns = Optional[Union[str, Sequence[str]]]


def _compile(patterns: Patterns, arg: str) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must be a regex string or a list of them, got {type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{arg}: {p!r} is not a valid regular expression ({e})") from None
    return out


def _is_projection(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D is a linear layer with a transposed weight; match it by
    # name so that importing agip never imports transformers.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_block(name: str) -> bool:
    # Transformer blocks live in an nn.ModuleList (``h.3.attn``, ``model.layers.3.mlp``):
    # a purely numeric path segment marks a module inside one.
    return any(part.isdigit() for part in name.split("."))


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    include: Patterns = None,
    exclude: Patterns = None,
) -> list:
    """Split ``model``'s trainable parameters into AGIP param groups (docs/algorithm.md §0, 5).

    Returns up to three torch param groups, each with a boolean ``"prune"`` key and the
    parameter names (as ``(name, tensor)`` pairs, which torch turns into ``"param_names"``):

    - ``prune=True``, decayed: the prunable set P (see module docstring), with
      ``"input_dims"``: each weight's input dimension (where N:M groups run);
    - ``prune=False``, decayed: other matrices (e.g. an untied ``lm_head``);
    - ``prune=False``, ``weight_decay=0``: biases, norms, embeddings.

    ``include`` / ``exclude`` are regular expressions (``re.search``) on parameter names.
    ``include`` replaces the default choice of P by the matching matrices (ndim >= 2);
    ``exclude`` removes matches from P. Frozen parameters (``requires_grad=False``) are
    left out. The groups also work unchanged with ``torch.optim.AdamW``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")

    embedding_params = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_params.add(id(module.weight))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head_params = {id(out_emb.weight)} if isinstance(out_emb, nn.Module) and hasattr(out_emb, "weight") else set()

    default_prunable, input_dim = set(), {}
    for mod_name, module in model.named_modules():
        if _is_projection(module) and getattr(module, "weight", None) is not None:
            # the input dimension of the weight (N:M groups run along it): Conv1D stores
            # (in, out), nn.Linear (out, in)
            input_dim[id(module.weight)] = 0 if type(module).__name__ == "Conv1D" else module.weight.ndim - 1
        if _is_projection(module) and _in_block(mod_name) and getattr(module, "weight", None) is not None:
            w = module.weight
            if id(w) not in embedding_params and id(w) not in lm_head_params:
                default_prunable.add(id(w))

    prune, decay, no_decay = [], [], []
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        if inc:
            is_prunable = p.ndim >= 2 and any(r.search(name) for r in inc)
        else:
            is_prunable = id(p) in default_prunable
        if is_prunable and any(r.search(name) for r in exc):
            is_prunable = False
        if is_prunable:
            prune.append((name, p))
        elif p.ndim < 2 or id(p) in embedding_params:
            no_decay.append((name, p))
        else:
            decay.append((name, p))

    groups = []
    if prune:
        groups.append({"params": prune, "weight_decay": float(weight_decay), "prune": True,
                       "input_dims": [input_dim.get(id(p), p.ndim - 1) for _, p in prune]})
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), "prune": False})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "prune": False})
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return groups
