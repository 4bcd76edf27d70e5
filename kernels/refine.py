"""Pass B of the AGIP step (pruning steps only): the low-16-bit histogram of the values
whose top 16 bits equal the selected bin, which makes the threshold exact (docs/algorithm.md §2.3).

Bytes per parameter of the prunable segment: reads the mask (1 B), g (4 B) and, for the
score, w (4 B) and for the Fisher score v (4 B) (+4 B with a saliency EMA): <= 13 B
(17 B); int32 histogram increments for the few entries inside the bin.
"""
import triton
import triton.language as tl

from .common import BLOCK, score


@triton.jit
def _refine_kernel(g_ptr, w_ptr, v_ptr, mask_ptr, ema_ptr, hist_ptr, n_prunable, prefix, clip, beta2, omb2,
                   ema_keep, ema_new, SALIENCY: tl.constexpr, SCORE: tl.constexpr, HAS_EMA: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inp = offs < n_prunable
    act = tl.load(mask_ptr + offs, mask=inp, other=0) != 0
    g = tl.load(g_ptr + offs, mask=inp, other=0.0).to(tl.float32)
    if SALIENCY:  # score of active entries (same arithmetic as pass A)
        w = tl.load(w_ptr + offs, mask=inp, other=0.0).to(tl.float32)
        v = w
        if SCORE >= 0:
            v = tl.load(v_ptr + offs, mask=inp, other=0.0).to(tl.float32)
        s = score(w, g, v, act, clip, beta2, omb2, SCORE)
        if HAS_EMA:
            s = tl.load(ema_ptr + offs, mask=inp, other=0.0) * ema_keep + s * ema_new
        sel = inp & act
    else:  # |g| of pruned entries (regrowth)
        s = tl.abs(g)
        sel = inp & (~act)
    bits = s.to(tl.int32, bitcast=True)
    hit = sel & ((bits >> 16) == prefix)
    tl.atomic_add(hist_ptr + (bits & 0xFFFF), 1, mask=hit)


def refine(g, w, v, mask, ema, n_prunable, prefix, saliency, fisher_q, clip, beta2, omb2, ema_keep, ema_new, hist,
           block=BLOCK):
    """Add to ``hist`` the low-digit counts of one bucket's values in bin ``prefix``."""
    nblocks = triton.cdiv(n_prunable, block)
    if nblocks == 0:
        return
    _refine_kernel[(nblocks,)](
        g, w, v, mask, ema if ema is not None else w, hist, n_prunable, prefix, clip, beta2, omb2, ema_keep, ema_new,
        SALIENCY=saliency, SCORE=fisher_q if saliency else -1, HAS_EMA=saliency and ema is not None, BLOCK=block, enable_fp_fusion=False,
    )
