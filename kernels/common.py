"""Triton kernels for the AGIP step, one file per fused op (installed as ``agip.kernels``),
and here what they share: the block size and the score.

- :mod:`.stats`  — pass A: G^2 partial sums; on pruning steps the saliency and regrowth
  histograms that start the exact radix select.
- :mod:`.refine` — pass B (pruning steps only): the low-digit histogram inside one bin.
- :mod:`.update` — pass C: clip, AdamW, TA, new mask, saliency EMA, ``w, m, v * M'``.

The folder has no ``__init__.py`` on purpose: transformers imports the PyPI package
``kernels``, and a regular package of that name in the checkout root would shadow it for
any Python started there (``python -m``, ``python -c``, notebooks). A folder without
``__init__.py`` is only a namespace portion, which Python ranks below a regular package
anywhere on ``sys.path``, so ``import kernels`` always finds the real one.
``agip.backends.triton`` imports this folder as ``agip.kernels`` (``_own_kernels``).

Importing these modules imports triton; ``import agip`` does not. On the CPU the kernels
run under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""
BLOCK = 1024  # elements per program


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def score(w, g, v, act, clip, beta2, omb2, SCORE: tl.constexpr):  # noqa: N803
    """The score of pre-update w (algorithm.md §2.1, §2.1b): Taylor ``|w g|`` (SCORE < 0)
    or Fisher ``|w| v_t^(SCORE/4)`` with ``v_t = beta2 v + (1 - beta2) ghat^2``,
    ghat = g M clip, in the same order of separately rounded operations as every backend."""
    if SCORE < 0:
        s = tl.abs(w * g)
    elif SCORE == 0:
        s = tl.abs(w)
    else:
        ghat = g * act.to(tl.float32) * clip
        vt = v * beta2 + omb2 * ghat * ghat
        if SCORE == 1:
            s = tl.abs(w) * tl.sqrt_rn(tl.sqrt_rn(vt))
        elif SCORE == 2:
            s = tl.abs(w) * tl.sqrt_rn(vt)
        else:
            s = tl.abs(w) * vt
    return s
