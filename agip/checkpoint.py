"""Checkpoints: a folder with the model (safetensors, pruned entries are zeros), its
config and tokenizer, the masks (``masks.safetensors``), the optimizer and LR-scheduler
state (``optimizer.pt``) and the training state (``trainer_state.json``).

Writes are atomic: each save writes a new versioned folder beside the target
(``.checkpoint-v000001``, ...), fsyncs its files and the folder, and only then points the
target (a symbolic link, e.g. ``runs/agip/checkpoint``) at it with one ``os.replace`` of
the link — atomic on POSIX. A kill at any moment leaves the target pointing at a complete
checkpoint, the old one or the new one; older versions are removed after the switch.
Where symbolic links cannot be made (or the target is a plain folder from an older
version), the folder is swapped with two renames instead, which a kill between them
can interrupt.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

from .comm import rank
from .dtensor import full, local, wrap_like

MODEL_FILE = "model.safetensors"


def full_state(model) -> dict:
    """The model's weights as separate CPU tensors, tied weights once.

    AGIP binds parameters to views of one flat buffer; safetensors refuses tensors that
    share memory, so each one is its own copy. FSDP2's sharded parameters are gathered
    whole (a collective: every rank calls this, in the same order).
    """
    seen, state = {}, {}
    for name, t in model.state_dict().items():
        key = (local(t).data_ptr(), tuple(t.shape))
        if key in seen:  # a tied weight (e.g. lm_head = embed_tokens): transformers re-ties it
            continue
        seen[key] = name
        state[name] = full(t).detach().to("cpu").clone().contiguous()
    return state


def optimizer_masks(optimizer) -> dict:
    """The masks of the prunable parameters by name, whole (FSDP2 shards gathered: a
    collective)."""
    masks = {}
    for group in optimizer.param_groups:
        for name, p in zip(group.get("param_names", []), group["params"]):
            st = optimizer.state.get(p, {})
            if "mask" in st:
                masks[name] = full(wrap_like(p, st["mask"])).detach().to("cpu").clone().contiguous()
    return masks


def fsync_tree(folder: str) -> None:
    """Flush every file of ``folder`` and the folder itself to disk."""
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def umask_modes(folder: str) -> None:
    """Give ``folder`` and everything in it the modes the process umask allows, as any tool's
    writes get: ``tempfile.mkdtemp`` makes the folder 0700 and safetensors writes its files
    0600, which another user, a group or a serving container could not read."""
    mask = os.umask(0o022)
    os.umask(mask)  # read, then restored at once (the only way to read it portably)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions(parent: str, base: str):
    pattern = re.compile(rf"^\.{re.escape(base)}-v(\d+)$")
    found = [(int(m.group(1)), name) for name in os.listdir(parent) if (m := pattern.match(name))]
    return sorted(found)


def _write(tmp: str, model, tokenizer, optimizer, scheduler, state, rng, weights=None, masks=None) -> None:
    from safetensors.torch import save_file

    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_file(full_state(model) if weights is None else weights, os.path.join(tmp, MODEL_FILE),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if masks is None and optimizer is not None:
        masks = optimizer_masks(optimizer)
    if masks:
        save_file(masks, os.path.join(tmp, "masks.safetensors"))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng},
                   os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state or {}, f, indent=2)
    fsync_tree(tmp)


def _remove_beside(parent: str, prefixes: tuple) -> None:
    """Remove the links and folders in ``parent`` whose names start with one of ``prefixes``."""
    for name in os.listdir(parent):
        if name.startswith(prefixes):
            full = os.path.join(parent, name)
            os.remove(full) if os.path.islink(full) else shutil.rmtree(full, ignore_errors=True)


def swap_in(version: str, path: str) -> None:
    """Put the complete folder ``version`` at ``path`` with renames (no symbolic link); an
    existing ``path`` is moved aside first and removed after the switch."""
    if not os.path.lexists(path):
        os.replace(version, path)
        return
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(path))
    os.replace(path, os.path.join(old, "ckpt"))
    os.replace(version, path)
    shutil.rmtree(old, ignore_errors=True)


def save(path: str, model, tokenizer, optimizer=None, scheduler=None, state: dict = None, rng=None,
         weights: dict = None, masks: dict = None) -> str:
    """Write a checkpoint atomically (see the module docstring); returns ``path``.

    ``rng`` is saved as given: ``agip finetune`` passes the CPU RNG state and, on CUDA,
    every device's RNG state too. ``weights`` and ``masks`` (gathered whole by
    :func:`save_full` under FSDP2) replace the model's and the
    optimizer's own; with them, pass no optimizer (its state is per rank).
    """
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    _remove_beside(parent, (f".{base}-tmp-", f".{base}-link-"))  # left by a killed save (one writer per folder)
    versions = _versions(parent, base)
    version = os.path.join(parent, f".{base}-v{(versions[-1][0] + 1) if versions else 1:06d}")
    tmp = tempfile.mkdtemp(prefix=f".{base}-tmp-", dir=parent)
    try:
        _write(tmp, model, tokenizer, optimizer, scheduler, state, rng, weights, masks)
        umask_modes(tmp)
        os.replace(tmp, version)  # complete and on disk: now it may be pointed at
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path) and not os.path.islink(path):  # a plain folder (an older version's)
        swap_in(version, path)
        return path
    link = os.path.join(parent, f".{base}-link-{os.getpid()}")
    try:
        os.symlink(os.path.basename(version), link)
    except OSError:  # no symbolic links on this file system
        swap_in(version, path)
        return path
    os.replace(link, path)  # the atomic switch
    fsync_dir(parent)
    for _, name in versions:  # the versions before this one are no longer pointed at
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return path


def remove(path: str) -> None:
    """Delete a checkpoint: the link, the versions beside it and any leftovers of a killed save."""
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    if os.path.islink(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    if os.path.isdir(parent):
        _remove_beside(parent, (f".{base}-v", f".{base}-tmp-", f".{base}-link-"))


def is_checkpoint(path: str) -> bool:
    """An AGIP checkpoint (``agip finetune``'s), not any ``save_pretrained`` folder: it also
    holds the training state."""
    return all(os.path.isfile(os.path.join(path, f)) for f in (MODEL_FILE, "config.json", "trainer_state.json"))


def load_model(path: str, dtype=torch.float32):
    """(model, tokenizer, trainer_state) of a checkpoint folder."""
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not an AGIP checkpoint (no {MODEL_FILE}, config.json and trainer_state.json); "
            "pass the folder that `agip finetune` wrote (its --out, subfolder 'checkpoint')"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    return model, tok, state


def load_training_state(path: str) -> dict:
    """The optimizer and scheduler state dicts and the RNG state of a checkpoint (for --resume)."""
    file = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} holds no optimizer state (optimizer.pt); it cannot be resumed")
    return torch.load(file, weights_only=True)


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
        raise FileNotFoundError(f"{path} is not a folder written by agip.checkpoint.save_sharded")
    sd = {"model": model.state_dict(), "optim": _optimizer_state(opt)}
    dcp.load(sd, checkpoint_id=path)  # tensors in place: the model's shards, AGIP's buffers
    model.load_state_dict(sd["model"])
    optim = sd["optim"]
    optim["state"] = {i: {k: local(t) for k, t in st.items()} for i, st in optim["state"].items()}
    opt.load_state_dict(optim)


def save_full(path: str, model, tokenizer, opt=None, state: dict = None) -> None:
    """One whole checkpoint (``model.safetensors``, ``masks.safetensors``, config and
    tokenizer; this module's layout) that a single process reads (``agip eval``),
    written by rank 0 from the gathered shards. Every rank must call it (a collective)."""
    import torch.distributed as dist

    weights = full_state(model)
    masks = optimizer_masks(opt) if opt is not None else None
    if rank() == 0:
        save(path, model, tokenizer, weights=weights, masks=masks, state=state)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
