"""Checkpoints: a folder with the model (safetensors, pruned entries are zeros), its
config and tokenizer, the masks (``masks.safetensors``), the optimizer and LR-scheduler
state (``optimizer.pt``) and the training state (``trainer_state.json``).

Writes are atomic: everything goes to a temporary folder beside the target, which then
replaces the target in one rename, so a killed run never leaves a half-written
checkpoint that loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

MODEL_FILE = "model.safetensors"


def _cloned_state(model) -> dict:
    # AGIP binds parameters to views of one flat buffer; safetensors refuses tensors that
    # share memory, so each one is saved as its own copy (tied weights once).
    seen, state = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:  # a tied weight (e.g. lm_head = embed_tokens): transformers re-ties it
            continue
        seen[key] = name
        state[name] = t.detach().to("cpu").clone().contiguous()
    return state


def save(path: str, model, tokenizer, optimizer=None, scheduler=None, state: dict = None, rng=None) -> str:
    """Write a checkpoint folder atomically; returns ``path``."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ckpt-", dir=parent)
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(_cloned_state(model), os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            masks = {}
            for group in optimizer.param_groups:
                for name, p in zip(group.get("param_names", []), group["params"]):
                    st = optimizer.state.get(p, {})
                    if "mask" in st:
                        masks[name] = st["mask"].detach().to("cpu").clone().contiguous()
            if masks:
                save_file(masks, os.path.join(tmp, "masks.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "rng": rng},
                       os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state or {}, f, indent=2)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(path, os.path.join(old, "ckpt"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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
