"""AGIP under DDP or FSDP2 on CPU tensors (gloo), and the one-process reference it must equal.

``tests/test_distributed.py`` runs ``torchrun --nproc_per_node 2 tests/dist_worker.py OUT
MODE:BACKEND:SALIENCY ...``; rank 0 writes each run's full weights, masks and every step's
theta to ``OUT``, and the test compares them with :func:`reference`, which runs in one
process.

How the reference matches the collectives exactly: each rank r trains on its own
micro-batch ``batch(step, r)``. The reference computes the gradient of each micro-batch
separately (``torch.autograd.grad``, one torch thread as the ranks use) and combines them as
DDP and FSDP2 do with two gloo ranks: each halved, then summed (halving is exact and a sum
of two values is the same in either order). The loss E_t is the mean of the two ranks'
losses (AGIP's one scalar all-reduce).
"""
from __future__ import annotations

import faulthandler
import os
import sys

import torch

# a rare SIGABRT ("terminate called without an active exception", once in ~20 runs of this
# worker in a full test session) left no trace of where: dump every thread's stack on it
faulthandler.enable()

# this checkout's agip, its root off sys.path (tests/conftest.py says why)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _checkout  # noqa: E402, F401

import agip  # noqa: E402
from agip.launch import teardown  # noqa: E402

STEPS = 10
WORLD = 2
# pruning every step from step 2 with regrowth and TA: every collective of a step is used
SETTINGS = dict(lr=3e-3, target_sparsity=0.5, schedule="cubic", total_steps=8, warmup_steps=1, prune_interval=1,
                regrow_fraction=0.1, ta_gamma=1.0, stability=False, max_grad_norm=1.0)


def build_model():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 64, (2, 16), generator=g)


def make_opt(model, backend: str, saliency: str):
    return agip.AGIP(agip.param_groups(model), backend=backend, saliency=saliency, **SETTINGS)


def reference(backend: str, saliency: str):
    """One process, the same global batches: (weights, masks, thetas)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model()
        opt = make_opt(model, backend, saliency)
        params = [p for g in opt.param_groups for p in g["params"]]
        thetas = []
        for step in range(STEPS):
            losses, grads = [], []
            for r in range(WORLD):
                x = batch(step, r)
                loss = model(x, labels=x).loss
                grads.append(torch.autograd.grad(loss, params))
                losses.append(float(loss.detach()))
            for p, *gs in zip(params, *grads):
                p.grad.copy_(sum(g / WORLD for g in gs))
            opt.step(loss=sum(losses) / WORLD)
            thetas.append(opt.sparsity_report()["theta"])
        return full_state(model, opt) + (thetas,)
    finally:
        torch.set_num_threads(threads)


def full_state(model, opt):
    """Full (unsharded) weights and masks by name: what agip's checkpoints gather."""
    from agip import checkpoint

    return checkpoint.full_state(model), checkpoint.optimizer_masks(opt)


def build(mode: str, backend: str, saliency: str, bucket_view: bool):
    """(model, the module to call, optimizer) on this rank."""
    model = build_model()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    elif mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    else:
        raise SystemExit(f"unknown mode {mode}")
    return model, wrapped, make_opt(model, backend, saliency)


def train(wrapped, opt, steps, thetas: list) -> None:
    import torch.distributed as dist

    for step in steps:
        x = batch(step, dist.get_rank())
        loss = wrapped(x, labels=x).loss
        loss.backward()
        opt.step(loss=loss)
        thetas.append(opt.sparsity_report()["theta"])
        opt.zero_grad()


def run(mode: str, backend: str, saliency: str, flags, folder: str) -> dict:
    """This rank's part of one distributed run; returns what rank 0 writes. ``flags``:
    ``bucket`` (DDP's gradient_as_bucket_view), ``resume`` (stop half-way, save the shards
    with agip.checkpoint.save_sharded, rebuild everything, load, go on), ``full`` (write a
    whole checkpoint with agip.checkpoint.save_full at the end)."""
    from agip import checkpoint

    model, wrapped, opt = build(mode, backend, saliency, "bucket" in flags)
    thetas = []
    if "resume" in flags:
        ckpt = os.path.join(folder, f"sharded-{mode}")
        train(wrapped, opt, range(STEPS // 2), thetas)
        checkpoint.save_sharded(ckpt, model, opt)
        model, wrapped, opt = build(mode, backend, saliency, "bucket" in flags)
        checkpoint.load_sharded(ckpt, model, opt)
        train(wrapped, opt, range(STEPS // 2, STEPS), thetas)
    else:
        train(wrapped, opt, range(STEPS), thetas)
    if "full" in flags:
        checkpoint.save_full(os.path.join(folder, f"full-{mode}"), model, None, opt, state={"steps": STEPS})
    weights, masks = full_state(model, opt)
    import torch.distributed as dist

    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, thetas)  # each rank's own decisions
    return {"weights": weights, "masks": masks, "thetas": thetas, "thetas_every_rank": every_rank,
            "report": opt.sparsity_report()}


def main(out: str, *runs: str) -> None:
    """``runs``: ``MODE:BACKEND:SALIENCY[:bucket]``, one after the other in one process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for spec in runs:
        mode, backend, saliency, *flags = spec.split(":")
        results[spec] = run(mode, backend, saliency, flags, os.path.dirname(os.path.abspath(out)))
        print(f"[rank {dist.get_rank()}] {spec} done", file=sys.stderr, flush=True)
    if dist.get_rank() == 0:
        torch.save(results, out)
    print(f"[rank {dist.get_rank()}] saved; leaving the group", file=sys.stderr, flush=True)
    teardown(True)  # the ranks leave together: rank 1 destroying its group while rank 0 saved aborted it


if __name__ == "__main__":
    main(*sys.argv[1:])
