"""Pass A of the AGIP step: G^2 partial sums and the radix-select histograms (docs/algorithm.md §1.2, 2).

Bytes per parameter (fp32 buffers, 1-byte mask): a non-pruning step reads g (4 B) and,
for prunable entries, the mask (1 B): <= 5 B. A Taylor pruning step also reads w (4 B) of
the prunable entries (+4 B with a saliency EMA): <= 9 B (13 B). The Fisher score needs
the clip factor, so it runs as a second launch after G^2 is known, reading g, mask, w
and v: 13 B (17 B with an EMA). Writes: one fp32 partial sum
per block and int32 histogram increments (atomics, one per prunable entry).
"""
import torch
import triton
import triton.language as tl

from .common import BLOCK, score


@triton.jit
def _stats_kernel(g_ptr, w_ptr, v_ptr, mask_ptr, ema_ptr, partial_ptr, sal_hist_ptr, grow_hist_ptr,
                  n, n_prunable, clip, beta2, omb2, ema_keep, ema_new, sal_lo, sal_hi,
                  SALIENCY: tl.constexpr, REGROW: tl.constexpr, SCORE: tl.constexpr, HAS_EMA: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    inp = offs < n_prunable
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    act = tl.load(mask_ptr + offs, mask=inp, other=1) != 0
    # g * M as a product (not a select), so an Inf gradient on a pruned entry still
    # poisons G^2 (Inf * 0 = NaN) exactly as in the reference: the step is skipped.
    gm = g * act.to(tl.float32)
    # Partial sums per block, reduced on the host in a fixed order: no float atomics,
    # so G^2 is the same run to run.
    tl.store(partial_ptr + pid, tl.sum(gm * gm, axis=0))
    if SALIENCY:
        w = tl.load(w_ptr + offs, mask=inp, other=0.0).to(tl.float32)
        v = w
        if SCORE >= 0:
            v = tl.load(v_ptr + offs, mask=inp, other=0.0).to(tl.float32)
        s = score(w, g, v, act, clip, beta2, omb2, SCORE)
        if HAS_EMA:
            s = tl.load(ema_ptr + offs, mask=inp, other=0.0) * ema_keep + s * ema_new
        # non-negative floats order like their bits: the top 16 bits are the first digit
        bins = s.to(tl.int32, bitcast=True) >> 16
        # outside the window [sal_lo, sal_hi]: lumped into the bins next to it
        bins = tl.where(bins < sal_lo, sal_lo - 1, tl.where(bins > sal_hi, sal_hi + 1, bins))
        tl.atomic_add(sal_hist_ptr + bins, 1, mask=inp & act)
    if REGROW:
        gbits = tl.abs(g).to(tl.int32, bitcast=True)
        tl.atomic_add(grow_hist_ptr + (gbits >> 16), 1, mask=inp & (~act))


def stats(g, w, v, mask, ema, n_prunable, saliency, regrow, fisher_q, clip, beta2, omb2, ema_keep, ema_new,
          sal_lo, sal_hi, sal_hist, grow_hist, block=BLOCK):
    """Launch pass A over one bucket; return its per-block fp32 partial sums of (g*M)^2.

    ``sal_hist`` receives the top-16-bit histogram of the score (``fisher_q`` -1: Taylor) of active prunable
    entries (bins outside ``[sal_lo, sal_hi]`` lumped into ``sal_lo - 1`` and
    ``sal_hi + 1``), ``grow_hist`` that of |g| of pruned ones (counts are added:
    several buckets share one histogram).
    """
    n = g.numel()
    nblocks = triton.cdiv(n, block)
    partial = torch.empty(nblocks, dtype=torch.float32, device=g.device)
    if nblocks == 0:
        return partial
    _stats_kernel[(nblocks,)](
        g, w, v, mask, ema if ema is not None else w, partial, sal_hist, grow_hist,
        n, n_prunable, clip, beta2, omb2, ema_keep, ema_new, sal_lo, sal_hi,
        SALIENCY=saliency and n_prunable > 0, REGROW=regrow and n_prunable > 0, SCORE=fisher_q,
        HAS_EMA=ema is not None,
        BLOCK=block, enable_fp_fusion=False,  # the saliency EMA must round like the reference
    )
    return partial


