"""Flat parameter buffers (docs/design.md, "Flat buffers").

Each dtype's parameters are packed into one contiguous bucket holding the weights, the
gradients and the Adam moments, with the prunable weights first (one segment
``[0, n_prunable)``, which also has a bool mask and, with a saliency EMA, an fp32 buffer).
Parameters and their ``.grad`` become views into the bucket, so every backend op is a
1-D pass over contiguous memory; each param group's range is contiguous too, so a group
is one launch with its own lr and weight decay.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .comm import Comm
from .dtensor import is_dtensor, local, wrap_like


@dataclass
class Slot:
    """One parameter's place in a bucket. An FSDP2 parameter (a DTensor) is ``mirrored``:
    its local shard is copied in before a step and out after it (docs/design.md,
    "Several processes"); any other parameter is a view of the bucket."""

    param: torch.Tensor
    name: str
    group: int
    start: int
    numel: int
    shape: tuple = ()
    mirrored: bool = False
    input_dim: int = -1  # the weight's input dimension (N:M groups run along it)


@dataclass
class Bucket:
    dtype: torch.dtype
    w: torch.Tensor
    g: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor  # bool, length n_prunable (1 = active)
    ema: Optional[torch.Tensor]  # fp32 saliency EMA over the prunable segment, or None
    n_prunable: int
    slots: List[Slot] = field(default_factory=list)
    # (group index, start, end): each group's contiguous range in this bucket
    ranges: List[tuple] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.w.numel()


class FlatState:
    """Packs ``param_groups`` into buckets and keeps params and grads bound to them."""

    def __init__(self, param_groups: list, saliency_ema: bool, comm: Optional[Comm] = None):
        self.comm = comm or Comm()
        devices = {local(p).device for g in param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must be on one device, found {sorted(map(str, devices))}; "
                "move the model to one device before creating the optimizer (with DDP or FSDP2: one "
                "device per process, e.g. torch.cuda.set_device(local_rank) before building the model)"
            )
        self.device = devices.pop() if devices else torch.device("cpu")
        self.rebound_grads = 0
        self.rebound_params = 0
        self.scratch: dict = {}  # a fused backend's state (agip.backends.fused.DriverState), by backend name
        self.buckets: List[Bucket] = []
        dtypes = []
        for g in param_groups:
            for p in g["params"]:
                if p.dtype not in dtypes:
                    dtypes.append(p.dtype)
        for dtype in dtypes:
            # prunable groups first, so the prunable weights form one leading segment
            order = sorted(range(len(param_groups)), key=lambda i: (not param_groups[i]["prune"], i))
            slots, ranges, n, n_prunable = [], [], 0, 0
            for gi in order:
                group = param_groups[gi]
                names = group.get("param_names") or [None] * len(group["params"])
                dims = group.get("input_dims") or [p.ndim - 1 for p in group["params"]]
                start = n
                for pi, (p, name, dim) in enumerate(zip(group["params"], names, dims)):
                    if p.dtype != dtype:
                        continue
                    shard = local(p)
                    slots.append(Slot(p, name or f"group{gi}.param{pi}", gi, n, shard.numel(), tuple(shard.shape),
                                      mirrored=is_dtensor(p), input_dim=dim))
                    n += shard.numel()
                if n > start:
                    ranges.append((gi, start, n))
                if group["prune"]:
                    n_prunable = n
            kw = dict(dtype=dtype, device=self.device)
            bucket = Bucket(
                dtype=dtype,
                w=torch.empty(n, **kw),
                g=torch.zeros(n, **kw),
                m=torch.zeros(n, **kw),
                v=torch.zeros(n, **kw),
                mask=torch.ones(n_prunable, dtype=torch.bool, device=self.device),
                ema=torch.zeros(n_prunable, dtype=torch.float32, device=self.device) if saliency_ema else None,
                n_prunable=n_prunable,
                slots=slots,
                ranges=ranges,
            )
            for s in slots:
                p = s.param
                bucket.w[s.start : s.start + s.numel].copy_(local(p).reshape(-1))
                if p.grad is not None:
                    bucket.g[s.start : s.start + s.numel].copy_(local(p.grad).reshape(-1))
                if not s.mirrored:
                    p.data = bucket.w[s.start : s.start + s.numel].view_as(p)
                self._bind_grad(bucket, s)
            self.buckets.append(bucket)
        # the global sizes (summed over ranks when the parameters are sharded)
        counts = torch.tensor([sum(b.n_prunable for b in self.buckets), sum(b.numel for b in self.buckets)],
                              dtype=torch.int64, device=self.device)
        self.n_prunable_global, self.numel_global = (int(x) for x in self.comm.sum_counts(counts))

    @staticmethod
    def _bind_grad(b: "Bucket", s: Slot) -> None:
        # an FSDP2 parameter's grad is a DTensor over our view: FSDP2 accumulates the
        # reduce-scattered gradient into an existing grad in place, so it lands here
        s.param.grad = wrap_like(s.param, b.g[s.start : s.start + s.numel].view(s.shape))

    # --- FSDP2: copies of the local shards ------------------------------------------
    def sync_in(self) -> None:
        """Copy mirrored (FSDP2) local shards into the buckets before a step."""
        for b in self.buckets:
            for s in b.slots:
                if s.mirrored:
                    b.w[s.start : s.start + s.numel].copy_(local(s.param).reshape(-1))

    def sync_out(self) -> None:
        """Copy the buckets back into mirrored (FSDP2) local shards after a step."""
        for b in self.buckets:
            for s in b.slots:
                if s.mirrored:
                    local(s.param).copy_(b.w[s.start : s.start + s.numel].view(s.shape))

    def stamp(self) -> tuple:
        """torch's version counters of w, v and the masks (buckets and parameters): the
        tuple changes whenever one of them is written in place through torch (``p.mul_``,
        ``p.copy_``, ``model.load_state_dict``, ``apply_mask``, the optimizer's
        ``load_state_dict``), but not by the fused kernels' own writes, so a stamp taken after
        a step equals the next step's unless something else wrote in between (docs/design.md
        "Scores ahead"). Writes through ``p.data`` bypass torch's counters and are not seen."""
        return tuple(t._version for b in self.buckets for t in (b.w, b.v, b.mask)) + \
            tuple(s.param._version for b in self.buckets for s in b.slots)

    # --- binding --------------------------------------------------------------------
    def rebind_grads(self) -> None:
        """Make every parameter and every ``p.grad`` a view of its bucket again (docs/design.md:
        a replaced grad, or a parameter copied to an equal device and dtype, is copied back and
        re-bound, and counted). A missing grad counts as zero.

        Checks everything before copying anything, so a bad grad changes no state.
        """
        todo, moved = [], []
        for b in self.buckets:
            for s in b.slots:
                p = s.param
                if not s.mirrored and p.data_ptr() != b.w.data_ptr() + s.start * b.w.element_size():
                    # copied to an equal place (transformers.Trainer's model.to("cpu:0") under
                    # torchrun copies CPU tensors): its values go back into the bucket
                    if p.device != self.device or p.dtype != b.dtype or tuple(p.shape) != s.shape:
                        raise RuntimeError(
                            f"parameter {s.name!r} no longer lives in the optimizer's flat buffer: it is now "
                            f"{p.dtype} on {p.device}, the optimizer's is {b.dtype} on {self.device} (was the model "
                            "moved or cast after the optimizer was created?); create the optimizer after model.to(...)"
                        )
                    moved.append((b, s))
                grad = p.grad if p.grad is None else local(p.grad)
                if grad is None:
                    todo.append((b, s, None))
                    continue
                if grad.is_sparse or grad.layout != torch.strided:
                    raise RuntimeError(
                        f"parameter {s.name!r} has a sparse gradient; AGIP needs dense gradients "
                        "(use nn.Embedding(sparse=False))"
                    )
                if tuple(grad.shape) != s.shape:
                    raise RuntimeError(f"gradient of {s.name!r} has shape {tuple(grad.shape)}, parameter {s.shape}")
                if grad.data_ptr() != b.g.data_ptr() + s.start * b.g.element_size() or not grad.is_contiguous():
                    todo.append((b, s, grad))
        for b, s in moved:
            view = b.w[s.start : s.start + s.numel]
            view.copy_(s.param.detach().reshape(-1))
            s.param.data = view.view_as(s.param)
            self.rebound_params += 1
        for b, s, grad in todo:
            view = b.g[s.start : s.start + s.numel]
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad.reshape(-1))
                self.rebound_grads += 1
            self._bind_grad(b, s)

    def zero_grad(self) -> None:
        """Zero every gradient in place and bind every ``p.grad`` to its bucket view."""
        for b in self.buckets:
            b.g.zero_()
            for s in b.slots:
                self._bind_grad(b, s)

    # --- bookkeeping ----------------------------------------------------------------
    @property
    def n_prunable(self) -> int:
        return sum(b.n_prunable for b in self.buckets)

    def prunable_slots(self):
        for b in self.buckets:
            for s in b.slots:
                if s.start < b.n_prunable:
                    yield b, s

    # --- masks ----------------------------------------------------------------------
    def apply_mask(self, b: Bucket, mask: torch.Tensor, start: int = 0, ema: Optional[torch.Tensor] = None) -> None:
        """Set the mask of ``b``'s prunable entries ``[start, start + mask.numel())`` to
        ``mask`` (bool, flat) and zero w, m, v where it is 0 (docs/algorithm.md §1.6). The
        saliency EMA there becomes ``ema`` where given (the step's new EMA), and is zeroed
        where the mask is 0 either way. Every path that changes a mask calls this."""
        sl = slice(start, start + mask.numel())
        drop = ~mask
        for buf in (b.w, b.m, b.v):
            buf[sl].masked_fill_(drop, 0)
        if b.ema is not None:
            if ema is not None:
                b.ema[sl].copy_(ema.masked_fill(drop, 0))
            else:
                b.ema[sl].masked_fill_(drop, 0)
        b.mask[sl].copy_(mask)
