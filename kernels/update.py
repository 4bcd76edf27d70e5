"""Pass C of the AGIP step: clip, AdamW, terminal attractor, new mask, saliency EMA and
``w, m, v * M'`` in one read and one write of each buffer (docs/algorithm.md §1.3-1.6, 2).

Bytes per parameter (fp32): reads w, g, m, v (16 B) and writes w, m, v (12 B): 28 B for
non-prunable entries; prunable entries also read the mask (1 B), and on pruning steps
write it (1 B); a saliency EMA adds 4 B read + 4 B write. So a non-pruning step (with
pass A's 5 B) moves <= 34 B. A Taylor pruning step: pass A 9 B, pass B 9 B (one refine
pass; a second digit outside the window costs another pass A), pass C 30 B: <= 48 B. A
Fisher pruning step: pass A 5 B, the score's own pass A' 13 B (it needs the clip factor),
pass B 13 B, pass C 30 B: <= 61 B. The Fisher score of v_(t-1) with scores ahead (AHEAD):
pass C also histograms the next step's score from the values it writes (one int32 atomic
per active prunable entry, no bytes read), so the next pruning step's pass A reads 5 B.
"""
import triton
import triton.language as tl

from .common import BLOCK, score


@triton.jit
def _update_kernel(w_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, ema_ptr, ahead_ptr, start, end,
                   decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,  # UpdateArgs' numbers
                   clip, neg_lr_s, theta, regrow_theta, ema_keep, ema_new, score_beta2, score_omb2,
                   ahead_lo, ahead_hi,
                   PRUNABLE: tl.constexpr, PRUNE_STEP: tl.constexpr, SCORE: tl.constexpr, HAS_EMA: tl.constexpr,
                   AHEAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = start + pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < end
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if PRUNABLE:
        act = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        ghat = g * act.to(tl.float32) * clip  # the gradient of the active network, clipped
        # the score from pre-update w, v and raw g (the Fisher v_t is the one stored below)
        s = score(w, g, v, act, clip, score_beta2, score_omb2, SCORE)
        if HAS_EMA:
            s = tl.load(ema_ptr + offs, mask=inb, other=0.0) * ema_keep + s * ema_new
    else:
        ghat = g * clip
    # AdamW as torch computes it: decay, lerp, addcmul, bias-corrected addcdiv
    w = w * decay
    m = tl.where(lerp_weight < 0.5, m + lerp_weight * (ghat - m), ghat - (ghat - m) * (1.0 - lerp_weight))
    v = v * beta2 + one_minus_beta2 * ghat * ghat
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w + step_size * tl.div_rn(m, denom)
    # terminal attractor: w -= lr * s * ghat (neg_lr_s = -lr * s)
    w = w + neg_lr_s * ghat
    if PRUNABLE:
        if PRUNE_STEP:
            grown = (~act) & (tl.abs(g) > regrow_theta)
            keep = tl.where(grown, float("inf"), s) > theta
            tl.store(mask_ptr + offs, keep, mask=inb)
        else:
            keep = act
        w = tl.where(keep, w, 0.0)
        m = tl.where(keep, m, 0.0)
        v = tl.where(keep, v, 0.0)
        if HAS_EMA:
            tl.store(ema_ptr + offs, tl.where(keep, s, 0.0), mask=inb)
    w = w.to(w_ptr.dtype.element_ty)
    v = v.to(v_ptr.dtype.element_ty)
    tl.store(w_ptr + offs, w, mask=inb)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=inb)
    tl.store(v_ptr + offs, v, mask=inb)
    if AHEAD:
        # the next step's score |w_t| v_t^p from the values as stored, as its pass A would compute it
        s_next = score(w.to(tl.float32), w.to(tl.float32), v.to(tl.float32), keep, 1.0, 1.0, 0.0, SCORE)
        bins = s_next.to(tl.int32, bitcast=True) >> 16
        bins = tl.where(bins < ahead_lo, ahead_lo - 1, tl.where(bins > ahead_hi, ahead_hi + 1, bins))
        tl.atomic_add(ahead_ptr + bins, 1, mask=inb & keep)


def update(w, g, m, v, mask, ema, start, end, args, ahead=None, block=BLOCK):
    """Launch pass C over ``[start, end)`` of one bucket (one param group's range);
    ``args`` is an :class:`agip.backends.UpdateArgs` (its numbers in the kernel's order).
    ``ahead = (hist, lo, hi, ...)`` on a prunable range (the Fisher score of v_(t-1), no EMA):
    also adds the next step's first-digit histogram over the window ``[lo, hi]`` to ``hist``
    (no kept band: the rest of the tuple is None)."""
    nblocks = triton.cdiv(end - start, block)
    if nblocks == 0:
        return
    hist, lo, hi = ahead[:3] if ahead is not None else (None, 0, 0)
    if ahead is not None and not (args.prunable and args.fisher_q >= 0 and ema is None):
        raise ValueError("scores ahead need a prunable range, the Fisher score of v_(t-1) and no saliency EMA")
    _update_kernel[(nblocks,)](
        w, g, m, v, mask, ema if ema is not None else w, hist if hist is not None else mask, start, end,
        *args.numbers(), lo, hi,
        PRUNABLE=args.prunable, PRUNE_STEP=args.prune_step, SCORE=args.fisher_q,
        HAS_EMA=args.prunable and ema is not None, AHEAD=ahead is not None,
        BLOCK=block, enable_fp_fusion=False,  # saliency and mask must match the reference bit for bit
    )
