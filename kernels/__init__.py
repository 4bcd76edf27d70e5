"""Triton kernels for the AGIP step, one file per fused op (installed as ``agip.kernels``).

- :mod:`.stats`  — pass A: G^2 partial sums; on pruning steps the saliency and regrowth
  histograms that start the exact radix select.
- :mod:`.refine` — pass B (pruning steps only): the low-digit histogram inside one bin.
- :mod:`.update` — pass C: clip, AdamW, TA, new mask, saliency EMA, ``w, m, v * M'``.

Importing this package imports triton; ``import agip`` does not import it. On the CPU the
kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""
BLOCK = 1024  # elements per program
