"""AGIP: Adaptive Gradient-Informed Pruning — prune LLMs while fine-tuning them.

``import agip`` is cheap: it imports neither triton nor transformers and compiles
nothing; backends load on first use.
"""
from . import distill, hf, precision
from .groups import param_groups
from .optimizer import AGIP, TAAdamW
from .export import load_sparse
from .step import ta_scale
from .schedule import SparsitySchedule

__version__ = "0.1.0"
__all__ = ["AGIP", "TAAdamW", "param_groups", "ta_scale", "SparsitySchedule", "hf", "distill", "precision", "load_sparse", "__version__"]
