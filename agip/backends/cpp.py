"""C++ backend for CPU tensors: ``csrc/`` (one file per pass; vectorized loops, ``at::parallel_for``),
driven by :class:`agip.backends.fused.FusedDriver`.

Built on first use with ``torch.utils.cpp_extension.load`` and ninja into a cache folder
(``$AGIP_CACHE_DIR`` or ``~/.cache/agip``), rebuilt when the source or the flags change;
``AGIP_CPU_TARGET=avx2`` (or ``avx512``) builds for that x86-64 level instead of this CPU's own
instructions, in a folder of its own, so one machine can time the code another CPU runs;
``python -m agip.backends.cpp`` builds it ahead of time. If the build fails, importing
this module raises ImportError naming the cause, and ``backend="auto"`` falls back to
``reference`` with one warning.
"""
from __future__ import annotations

import torch

from . import CPU_TARGETS, cache_dir, cpu_march, load_extension, native_target
from .fused import FusedDriver, Kernels

# -mprefer-vector-width=512: where -march=native has AVX-512, GCC otherwise picks 256-bit
# vectors; the score and histogram loops are compute-bound (an Intel Xeon: the Fisher pruning
# step's update 183 -> 161 ms at 134.5M; same IEEE operations per lane, so the same bits).
# -fno-trapping-math lets GCC vectorize the score loops (it may then evaluate FP ops speculatively;
# results and rounding are unchanged, and no code here reads FP exception flags)
FLAGS = ["-O3", f"-march={cpu_march()}", "-mtune=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
         "-fno-trapping-math", "-std=c++17"]


# one file per pass (A: stats, B: refine, C: update) around the shared headers, and the binding
SOURCES = ["agip_cpu.cpp", "stats.cpp", "refine.cpp", "update.cpp"]
HEADERS = ["agip_cpu.h", "agip_math.h"]


# what each build target needs of this CPU (a build it cannot run would die of an illegal instruction)
NEEDS = {"x86-64-v3": ("__AVX2__", "__FMA__"), "x86-64-v4": ("__AVX512F__", "__AVX512BW__", "__AVX512VL__")}


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension and return the module. The target is
    ``$AGIP_CPU_TARGET`` (``native``, ``avx2``, ``avx512``; agip.backends.CPU_TARGETS), each
    built in a cache folder of its own."""
    march = cpu_march()
    here = native_target("native")
    missing = [m for m in NEEDS.get(march, ()) if f"#define {m} 1" not in here]
    if missing:
        target = next(k for k, v in CPU_TARGETS.items() if v == march)
        raise ImportError(f"AGIP_CPU_TARGET={target} needs {', '.join(missing)}, which this CPU lacks: unset it (or "
                          "take 'native')")
    return load_extension("cpp", "agip_cpu", SOURCES, headers=HEADERS, hint="; it needs a C++ compiler and ninja "
                          "(pip install ninja)", extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=verbose)


_ext = build()


def check_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors; these parameters are on {device}: use backend='auto'")


def _update(w, g, m, v, mask, ema, start, end, args, ahead) -> None:
    _ext.update(w, g, m, v, mask, ema, start, end, args.numbers(), args.prunable, args.prune_step, args.fisher_q,
                *(ahead or (None, 0, 0, None, None, 0, -1)))


_driver = FusedDriver("cpp", Kernels(stats=_ext.stats, refine=_ext.refine, update=_update,
                                     refine_keys=_ext.refine_keys, candidates=True))
grad_sumsq, select, update = _driver.grad_sumsq, _driver.select, _driver.update

if __name__ == "__main__":
    print(f"AGIP C++ backend built in {cache_dir('cpp')}")
