"""What AGIP's math needs across ranks, on PyTorch's own engine (docs/algorithm.md §6).

AGIP adds no communication layer: data parallelism is DDP's or FSDP2's (``fully_shard``).
On top of them one pruning decision needs only sums:

- **replicated** parameters (DDP): every rank holds the same averaged gradients and the
  same weights, so every rank computes the same theta on its own; only the loss E_t of
  the TA term and the stability factor is averaged over ranks (one scalar all-reduce).
- **sharded** parameters (FSDP2: ``DTensor`` parameters whose local shards each rank
  holds): besides the loss, G^2, the numbers of prunable / pruned entries and the
  radix-select histograms are summed over ranks. Integer counts sum exactly in any order,
  so theta, the number pruned and the masks are exactly those one process would find for
  the whole model.

:class:`Comm` is the one object the optimizer and the backends call for this; on a single
process all its operations return their input.
"""
from __future__ import annotations

import torch

from .dtensor import is_dtensor


class Comm:
    """The collectives of one AGIP optimizer: ``world == 1`` does nothing."""

    def __init__(self, group=None, world: int = 1, sharded: bool = False):
        self.group, self.world, self.sharded = group, world, sharded

    @property
    def active(self) -> bool:
        return self.world > 1

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # gloo reduces CPU tensors, nccl CUDA ones: the buffers' device decides
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def mean(self, x: float, device) -> float:
        """The mean over ranks of a float (the loss E_t); a non-finite value anywhere makes
        the mean non-finite everywhere, so every rank skips the same steps."""
        if not self.active:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device)
        return float(self._all_reduce(t)[0]) / self.world

    def sum_sharded(self, x: float, device) -> float:
        """The sum over ranks of a float computed over local shards (G^2); identity when
        the parameters are replicated (every rank already has the whole sum)."""
        if not (self.active and self.sharded):
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device)
        return float(self._all_reduce(t)[0])

    def sum_replicated(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor each rank computed from its own batches (the inputs' second moment of
        compensate='obs') over ranks, in place; identity in one process."""
        if self.active:
            self._all_reduce(t)
        return t

    def sum_counts(self, t: torch.Tensor) -> torch.Tensor:
        """Sum integer counts over ranks in place (histograms, kept-entry counts) when the
        parameters are sharded; integers sum exactly in any order."""
        if self.active and self.sharded:
            self._all_reduce(t)
        return t


def make_comm(params, process_group=None) -> Comm:
    """The :class:`Comm` for ``params`` (docs/algorithm.md §6).

    - ``DTensor`` parameters (FSDP2): sharded, over their device mesh's process group
      (``process_group`` must be that group if given);
    - otherwise, when ``torch.distributed`` is initialised with more than one rank, or when
      ``process_group`` is given: replicated (DDP) over that group (default: the world);
    - otherwise a single process.
    """
    import torch.distributed as dist

    dtensors = [p for p in params if is_dtensor(p)]
    if dtensors and len(dtensors) != len(params):
        raise ValueError("some parameters are DTensors (FSDP2 shards) and some are not: apply fully_shard to the "
                         "whole model (its root module too) before creating the optimizer")
    if process_group is not None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group= was passed but torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
    if dtensors:
        meshes = {p.device_mesh for p in dtensors}
        if len(meshes) > 1:
            raise ValueError("the parameters live on different device meshes; AGIP supports one FSDP2 mesh")
        mesh = meshes.pop()
        if mesh.ndim != 1:
            raise ValueError(f"AGIP supports a 1-D FSDP2 mesh (data parallel shards), got a {mesh.ndim}-D mesh; "
                             "HSDP and tensor parallelism are not supported")
        for p in dtensors:
            if any(not pl.is_shard() and not pl.is_replicate() for pl in p.placements):
                raise ValueError(f"unsupported DTensor placement {p.placements}: AGIP supports Shard and Replicate")
        group = mesh.get_group()
        if process_group is not None and process_group is not group:
            raise ValueError("process_group= differs from the FSDP2 mesh's group: leave it out, AGIP uses the mesh's")
        return Comm(group, dist.get_world_size(group), sharded=any(pl.is_shard() for p in dtensors
                                                                   for pl in p.placements))
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        world = dist.get_world_size(process_group)
        return Comm(process_group, world, sharded=False)
    return Comm()


def rank(group=None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
