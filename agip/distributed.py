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

try:  # DTensor is public from torch 2.5 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


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


def rank(group=None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


# --- checkpoints under FSDP2 / DDP ---------------------------------------------------
def _optimizer_state(opt) -> dict:
    """``opt.state_dict()`` with each state tensor a DTensor laid out like its parameter
    (sharing the optimizer's memory), the form ``torch.distributed.checkpoint`` needs to
    store each rank's shards."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        sd["state"][i] = {k: wrap_like(p, t) for k, t in sd["state"].get(i, {}).items()}
    return sd


def save_sharded(path: str, model, opt) -> None:
    """Every rank's shards of the model and of AGIP's state (m, v, masks, saliency EMA,
    counters, schedule) with ``torch.distributed.checkpoint`` (a collective). Resume with
    :func:`load_sharded` on the same number of processes: it continues bit for bit."""
    import torch.distributed.checkpoint as dcp

    if not isinstance(path, str) or not path:
        raise ValueError(f"save_sharded needs a folder path, got {path!r}")
    dcp.save({"model": model.state_dict(), "optim": _optimizer_state(opt)}, checkpoint_id=path)


def load_sharded(path: str, model, opt) -> None:
    """Load what :func:`save_sharded` wrote into ``model`` and ``opt`` (built as when it was
    saved: the same model, wrapping and world size)."""
    import os

    import torch.distributed.checkpoint as dcp

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder written by agip.distributed.save_sharded")
    sd = {"model": model.state_dict(), "optim": _optimizer_state(opt)}
    dcp.load(sd, checkpoint_id=path)  # tensors in place: the model's shards, AGIP's buffers
    model.load_state_dict(sd["model"])
    optim = sd["optim"]
    optim["state"] = {i: {k: local(t) for k, t in st.items()} for i, st in optim["state"].items()}
    opt.load_state_dict(optim)


def save_full(path: str, model, tokenizer, opt=None, state: dict = None) -> None:
    """One whole checkpoint (``model.safetensors``, ``masks.safetensors``, config and
    tokenizer; agip/checkpoint.py's layout) that a single process reads (``agip eval``),
    written by rank 0 from the gathered shards. Every rank must call it (a collective)."""
    import torch.distributed as dist

    from . import checkpoint

    weights = checkpoint.full_state(model)
    masks = checkpoint.optimizer_masks(opt) if opt is not None else None
    if rank() == 0:
        checkpoint.save(path, model, tokenizer, weights=weights, masks=masks, state=state)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- the harness under torchrun ---------------------------------------------------------
def init_from_env() -> tuple:
    """When launched by ``torchrun`` (``WORLD_SIZE`` > 1), initialise ``torch.distributed``
    (nccl on CUDA, gloo on the CPU) and pick this rank's GPU. Returns (rank, world size,
    device, whether this call initialised the process group)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1 and not dist.is_initialized():
        return 0, 1, torch.device("cuda" if cuda else "cpu"), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                               "start at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


def shard_model(model) -> None:
    """FSDP2 in place: ``fully_shard`` on each transformer block (the classes a transformers
    model names in ``_no_split_modules``), then on the whole model."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules): "
                         "shard it yourself with fully_shard and build AGIP on it")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def mean_over_ranks(x: float, device) -> float:
    """The mean of a float over all ranks (itself in a single process)."""
    return Comm(None, world_size()).mean(x, device)
