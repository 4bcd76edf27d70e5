"""A pruned model as a compact file: the ``agip-sparse`` format, its loader, and the way
back to a standard folder (``agip export``, :func:`load_sparse`, ``agip unpack``).

No current loader reads a compact sparse checkpoint (compressed-tensors dropped its sparse
compressors, transformers its sparse loading, vLLM refuses them), so AGIP writes its own
format, small and explicit, and makes every other loader fail loudly on it.

**Format ``agip-sparse``, version 1.** A folder with ``config.json``,
``generation_config.json``, the tokenizer's files and one ``model.agip.safetensors``, and
no ``model.safetensors`` (a plain ``from_pretrained`` finds no weights and raises; the
config carries no ``quantization_config`` or ``sparsity_config``). In the safetensors file:

- a pruned matrix ``NAME`` is two tensors: ``NAME.bitmask`` (uint8, 1 bit per entry in
  row-major order, least significant bit first, the last byte zero-padded) and
  ``NAME.values`` (the kept entries in row-major order, in the export's dtype);
- every other tensor (and a pruned matrix whose bitmask would cost more than it saves) is
  stored as it is under its own name, floating-point tensors cast to the export's dtype;
- the metadata: ``format`` = ``agip-sparse``, ``format_version`` = ``1``, ``dtype``, and
  ``tensors``: JSON with, per tensor, its ``shape``, ``layout`` (``bitmask`` or ``dense``),
  ``sparsity`` and, where every group of M entries along the input keeps at most M - N,
  the ``nm`` pattern (``"2:4"``; checked on the masks, never taken from a run's settings).

The masks are AGIP's own (``masks.safetensors`` of a checkpoint), not ``w != 0``; a plain
folder without them (what other pruning scripts save: dense zeros) needs ``masks="zeros"``.
Writes go to a temporary folder beside the target, are fsynced, and appear with one
rename: an interrupted export leaves no folder that loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
import torch

from .checkpoint import MODEL_FILE, fsync_dir, fsync_tree, full_state, swap_in, umask_modes

FORMAT, VERSION = "agip-sparse", "1"
SPARSE_FILE = "model.agip.safetensors"
CARD_FILE = "README.md"  # the model card: what the folder is, how to load it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("agip-sparse", "dense")
PATTERNS = ((2, 4), (4, 8))  # checked in this order; the first that every group satisfies is recorded


def is_sparse_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SPARSE_FILE))


def dtype_of(name: Optional[str]):
    """``fp32`` / ``bf16`` / ``fp16`` as a torch dtype (None stays None)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {tuple(DTYPES)}")
    return DTYPES[name]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an element's bits, by its size


def dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"the export stores fp32, bf16 or fp16 weights, got {dtype}")
    return names[dtype]


# --- bits ---------------------------------------------------------------------------------
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 1 bit per entry, row-major, least significant bit first."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(bool))


def nm_pattern(mask: torch.Tensor, input_dim: int) -> Optional[str]:
    """``"N:M"`` where every group of M consecutive entries along ``input_dim`` keeps at most
    M - N of them (and at least one group is pruned so), else None."""
    if mask.ndim != 2:
        return None
    rows = mask.movedim(input_dim, -1)
    for n, m in PATTERNS:
        if rows.shape[-1] % m == 0:
            kept = rows.reshape(-1, m).sum(dim=1)
            if bool((kept <= m - n).all()):
                return f"{n}:{m}"
    return None


def sparse_bytes(numel: int, kept: int, element_size: int) -> int:
    """The bytes a bitmask tensor costs: the bits and the kept values."""
    return (numel + 7) // 8 + kept * element_size


# --- export ---------------------------------------------------------------------------------
def _source(src: str, masks: Optional[str]):
    """(model, tokenizer, masks by name, input dims by name, how many zeros the masks found)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .groups import param_groups

    if not os.path.isdir(src) or not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src} is not a model folder (no config.json): pass a checkpoint of `agip finetune` "
                                "(its --out, subfolder 'checkpoint') or a save_pretrained folder")
    if is_sparse_export(src):
        raise ValueError(f"{src} is an agip-sparse export already: `agip unpack` it to a standard folder first")
    if masks not in (None, "zeros"):
        raise ValueError(f"masks must be None (AGIP's masks.safetensors) or 'zeros' (w == 0), got {masks!r}")
    mask_file = os.path.join(src, "masks.safetensors")
    if masks is None and not os.path.isfile(mask_file):
        raise FileNotFoundError(f"{src} holds no AGIP masks (masks.safetensors); for a folder whose pruned weights are "
                                "zeros (e.g. saved by llmcompressor, Wanda or SparseGPT scripts) pass --masks zeros")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src) if _has_tokenizer(src) else None
    dims = {}
    for g in param_groups(model):
        if g["prune"]:
            dims.update(zip([n for n, _ in g["params"]], g["input_dims"]))
    weights = full_state(model)
    if masks is None:
        from safetensors.torch import load_file

        found = load_file(mask_file)
        for name, m in found.items():
            if name not in weights:
                raise ValueError(f"{mask_file}: mask {name!r} names no tensor of the model")
            if tuple(m.shape) != tuple(weights[name].shape) or m.dtype != torch.bool:
                raise ValueError(f"{mask_file}: the mask of {name!r} is {m.dtype} of shape {tuple(m.shape)}, its weight "
                                 f"has shape {tuple(weights[name].shape)}: a bool mask of the weight's shape is needed")
    else:
        found = {n: weights[n] != 0 for n in dims if n in weights}
    zeros = sum(int((~m).sum()) for m in found.values())
    return model, tok, weights, found, dims, zeros


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _write_folder(out: str, overwrite: bool, write) -> None:
    """Run ``write(tmp)`` into a temporary folder beside ``out``, fsync it, then rename it to
    ``out`` (an existing ``out`` is replaced only with ``overwrite``, and only after the new
    folder is complete)."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite (overwrite=True) to replace it, or another folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-tmp-", dir=parent)
    try:
        write(tmp)
        umask_modes(tmp)
        fsync_tree(tmp)
        swap_in(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_side_files(tmp: str, model, tok) -> None:
    config = model.config.to_dict()
    for key in ("quantization_config", "sparsity_config", "compression_config"):
        config.pop(key, None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)


def export(src: str, out: str, dtype: Optional[str] = None, format: str = "agip-sparse",
           masks: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write the model of ``src`` (a checkpoint of ``agip finetune``, or with
    ``masks="zeros"`` any save_pretrained folder) to ``out`` in ``format`` (see the module
    docstring) and ``dtype`` (``fp32``, ``bf16``, ``fp16``; default: the source's, fp32).
    Returns what was written: sizes, per-tensor layouts, how many zeros the masks found."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: use one of {FORMATS}")
    target = dtype_of(dtype) or torch.float32
    model, tok, weights, masks_found, dims, zeros = _source(src, masks)
    if format == "dense":
        with torch.no_grad():  # w * M (a no-op where the masks' zeros are already in w)
            for name, p in model.named_parameters():
                if name in masks_found:
                    p.masked_fill_(~masks_found[name], 0)

        def write(tmp):
            model.to(target).save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
        _write_folder(out, overwrite, write)
        return {"format": "dense", "dtype": dtype_name(target), "bytes": _size(out, MODEL_FILE), "zeros_found": zeros}

    from safetensors.torch import save_file

    tensors, info, expected = {}, {}, 0
    for name, w in weights.items():
        w = w.to(target) if w.is_floating_point() else w
        mask = masks_found.get(name)
        entry = {"shape": list(w.shape), "dtype": str(w.dtype).replace("torch.", "")}
        if mask is not None:
            kept = int(mask.sum())
            entry["sparsity"] = 1 - kept / max(1, mask.numel())
            entry["nm"] = nm_pattern(mask, dims.get(name, w.ndim - 1))
            if sparse_bytes(w.numel(), kept, w.element_size()) < w.numel() * w.element_size():
                tensors[f"{name}.bitmask"] = pack_bits(mask)
                tensors[f"{name}.values"] = w[mask].contiguous()
                entry["layout"] = "bitmask"
                expected += sparse_bytes(w.numel(), kept, w.element_size())
                info[name] = entry
                continue
        entry["layout"] = "dense"
        tensors[name] = w.contiguous()
        expected += w.numel() * w.element_size()
        info[name] = entry
    metadata = {"format": FORMAT, "format_version": VERSION, "dtype": dtype_name(target),
                "tensors": json.dumps(info, sort_keys=True)}

    def write(tmp):
        _save_side_files(tmp, model, tok)
        save_file(tensors, os.path.join(tmp, SPARSE_FILE), metadata=metadata)
        with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as f:
            f.write(model_card(info, dtype_name(target), getattr(model.config, "model_type", "?")))

    _write_folder(out, overwrite, write)
    return {"format": FORMAT, "dtype": dtype_name(target), "bytes": _size(out, SPARSE_FILE),
            "tensor_bytes": expected, "zeros_found": zeros, "tensors": info}


def model_card(info: dict, dtype: str, model_type: str) -> str:
    """The export folder's README.md: what the folder is and how to load it, for a person
    who finds it on disk (a plain ``from_pretrained`` only says it has no model.safetensors)."""
    pruned = {n: e for n, e in info.items() if "sparsity" in e}
    numel = {n: int(np.prod(e["shape"])) if e["shape"] else 1 for n, e in pruned.items()}
    total = sum(numel.values())
    sparsity = sum(e["sparsity"] * numel[n] for n, e in pruned.items()) / max(1, total)
    patterns = sorted({e["nm"] for e in pruned.values() if e.get("nm")})
    nm = patterns[0] if len(patterns) == 1 and all(e.get("nm") for e in pruned.values()) else None
    return f"""# A pruned {model_type} model in AGIP's compact sparse format

This folder is an `{FORMAT}` export, format version {VERSION}, written by `agip export`
(AGIP: pruning while fine-tuning). Its weights are in `{SPARSE_FILE}`: each pruned matrix as
a bitmask and its kept values, everything else dense, in {dtype}. There is no
`model.safetensors`, so `transformers`' `from_pretrained` cannot read this folder on its own.

- pruned matrices: {len(pruned)}, {total:,} weights, **{sparsity:.1%} of them pruned**
- pattern: {f"**{nm}** in every pruned matrix (checked on the masks)" if nm else "unstructured"}
- stored dtype: {dtype}

## Load it

```python
import agip
model = agip.load_sparse("path/to/this/folder")  # a normal transformers model, pruned entries 0
```

or turn it into a standard folder that any tool reads (dense, pruned entries zero):

```
agip unpack path/to/this/folder path/to/dense-folder
```

Both need `pip install agip` with the `harness` extra (transformers, safetensors). The format
(tensor names, bit order, metadata) is described in the docstring of `agip/export.py`.
"""


def _size(folder: str, name: str) -> int:
    return os.path.getsize(os.path.join(folder, name))


# --- load -----------------------------------------------------------------------------------
def read_sparse(path: str) -> tuple:
    """(the model's state dict, dense and whole, in the stored dtype; the per-tensor info) of
    an ``agip-sparse`` folder. Every tensor is checked before any is returned."""
    from safetensors import SafetensorError, safe_open

    file = os.path.join(path, SPARSE_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not an agip-sparse export (no {SPARSE_FILE}); write one with `agip export`")
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{file} is not in the {FORMAT} format (format={meta.get('format')!r})")
            if meta.get("format_version") != VERSION:
                raise ValueError(f"{file} is {FORMAT} version {meta.get('format_version')!r}; this AGIP reads version "
                                 f"{VERSION}: upgrade agip (pip install -U agip) to read it")
            info = json.loads(meta["tensors"])
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{file} cannot be read ({type(e).__name__}: {e}); the file is damaged or truncated: "
                         "export it again") from None
    from concurrent.futures import ThreadPoolExecutor

    # numpy releases the GIL in its loops: the tensors decode side by side
    with ThreadPoolExecutor(max(1, min(8, torch.get_num_threads()))) as pool:
        decoded = pool.map(lambda item: _decode(file, raw, *item), info.items())
        state = dict(zip(info, decoded))
    return state, info


def _decode(file: str, raw: dict, name: str, entry: dict) -> torch.Tensor:
    """One tensor of an agip-sparse file, dense, checked against its entry in the metadata."""
    shape = tuple(entry["shape"])
    numel = int(np.prod(shape)) if shape else 1
    if entry["layout"] == "dense":
        t = raw.get(name)
        if t is None or tuple(t.shape) != shape:
            raise ValueError(f"{file}: tensor {name!r} is missing or not of shape {shape}: the file is damaged")
        return t
    bits, values = raw.get(f"{name}.bitmask"), raw.get(f"{name}.values")
    if bits is None or values is None or bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
        raise ValueError(f"{file}: the bitmask of {name!r} is missing or of the wrong size: the file is damaged")
    # in numpy, on the values' bits (numpy has no bf16), scattered by index: torch's bool sum
    # and masked assignment made the load 20-50x the dense checkpoint's (bench_export.py)
    where = np.flatnonzero(unpack_bits(bits, numel).numpy())
    if where.size != values.numel():
        raise ValueError(f"{file}: {name!r} has {where.size} kept entries in its bitmask but {values.numel()} "
                         "stored values: the file is damaged")
    raw_values = values.contiguous().view(_BITS[values.element_size()]).numpy()
    dense = np.zeros(numel, dtype=raw_values.dtype)
    dense[where] = raw_values
    return torch.from_numpy(dense).view(values.dtype).view(shape)


def load_sparse(path: str, dtype=None, device=None):
    """The model of an ``agip-sparse`` folder as a normal ``transformers`` model (tied
    weights tied), its weights bit-identical to the exported ones in the stored dtype (or
    cast to ``dtype``: a torch dtype or ``"fp32"`` / ``"bf16"`` / ``"fp16"``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state, _ = read_sparse(path)
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    dtype = dtype_of(dtype) if isinstance(dtype, str) else (dtype or stored)
    with _no_init_weights():  # every weight is overwritten below: drawing random ones cost 1.8-3.4 s
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    result = model.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()},
                                   strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{path}: the export holds {result.unexpected_keys[:5]}, which its config.json's model has not")
    missing = result.missing_keys
    model.tie_weights()
    # a key the file leaves out must be tied to one it holds (lm_head = embed_tokens), never random
    ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in ptrs]
    if untied:
        raise ValueError(f"{path}: the export lacks {untied[:5]}{'...' if len(untied) > 5 else ''}: it does not match "
                         "its config.json (export the model again)")
    model.eval()
    return model.to(device) if device is not None else model


def _no_init_weights():
    """transformers' context that skips the weights' random initialisation (the module moved
    in transformers 5), or nothing where neither is there."""
    import contextlib

    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(__import__(module, fromlist=["no_init_weights"]), "no_init_weights")()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def unpack(path: str, out: str, dtype: Optional[str] = None, overwrite: bool = False) -> str:
    """Write the model of an ``agip-sparse`` folder as a standard ``save_pretrained`` folder
    (dense, pruned entries zero) that any tool reads; returns ``out``."""
    model = load_sparse(path, dtype=dtype)

    def write(tmp):
        model.save_pretrained(tmp)
        for f in os.listdir(path):  # the tokenizer's files
            if f not in (SPARSE_FILE, CARD_FILE, "config.json", "generation_config.json"):
                shutil.copy2(os.path.join(path, f), os.path.join(tmp, f))

    _write_folder(out, overwrite, write)
    return out
