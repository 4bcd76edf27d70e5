"""The harness under ``torchrun``: the process group, this rank's device, and the model
wrapped for training (DDP, or FSDP2's ``fully_shard``). The library never imports this
module: the optimizer finds its process group through :mod:`agip.comm`.
"""
from __future__ import annotations

import torch


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


def check_world(cfg, world: int) -> None:
    """The options that depend on the number of processes (checked before anything loads)."""
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over several processes: launch with torchrun --nproc_per_node N "
                         "(N >= 2), e.g. torchrun --nproc_per_node 2 -m agip.cli finetune --fsdp")
    if world > 1 and (cfg.resume or cfg.checkpoint_every):
        raise ValueError("--resume and --checkpoint-every run in one process only for now; with several processes "
                         "use agip.checkpoint.save_sharded / load_sharded from Python (docs/design.md)")


def wrap(model, fsdp: bool, world: int, device: torch.device):
    """The module to train: FSDP2 shards ``model`` in place (before the optimizer is built on
    its shards) and returns it; DDP wraps it for training only; one process trains it as it is."""
    if fsdp:
        shard_model(model)
        return model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def teardown(started: bool) -> None:
    """Destroy the process group that :func:`init_from_env` started (none otherwise). The
    ranks leave together: one rank destroying its gloo group while another still writes
    (rank 0's report, checkpoint) aborted the process now and then ("terminate called
    without an active exception", SIGABRT at exit)."""
    if started:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
