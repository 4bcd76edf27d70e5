"""DTensor helpers (FSDP2's sharded parameters), the leaf every other module may import.

``torch.distributed.tensor.DTensor`` is public from torch 2.5 on; where torch has no
distributed support every tensor is a plain one.
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """The local part of a parameter: a DTensor's local shard (sharing its storage), or the
    tensor itself."""
    return p.to_local().detach() if is_dtensor(p) else p


def wrap_like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a local tensor shaped like ``p``'s shard) as a DTensor laid out like ``p``;
    ``t`` itself when ``p`` is a plain tensor."""
    if not is_dtensor(p):
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank calls it), or ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t
