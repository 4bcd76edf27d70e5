"""Triton backend: the AGIP step as three fused passes over each flat bucket
(DESIGN.md, "The way data flows"; kernels in ``agip.kernels``).

Pass A (``grad_sumsq``) reads g once for G^2 and, on pruning steps, builds the first
radix digit's histograms; ``select`` finishes the exact selections with one refine pass
per threshold (host-side work is a 65,536-bin cumulative sum); pass C (``update``) does
the rest in one read and one write. Runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (for tests).
"""
from __future__ import annotations

import math
import os

import torch

from . import Selection, StepPlan, regrow_counts

try:
    from agip.kernels import BLOCK, HIST_BINS
    from agip.kernels.refine import refine
    from agip.kernels.stats import stats
    from agip.kernels.update import update as update_kernel
except ImportError as e:  # triton missing or broken: say what to do
    raise ImportError(f"the triton backend needs triton ({e}); pip install triton, or use backend='reference'") from e

from agip.threshold import radix_select_count

INF_BIN = 0x7F80  # top 16 bits of +inf: where regrown entries (saliency +inf) sit
block = BLOCK  # tests shrink it to run many programs on small buffers


def check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"backend='triton' runs on CUDA tensors; these parameters are on {device}. "
        "Use backend='auto' (or 'reference'), or set TRITON_INTERPRET=1 before importing triton to "
        "run the kernels in the (slow) interpreter"
    )


def _scratch(flat):
    sc = flat.scratch.get("triton")
    if sc is None:
        kw = dict(dtype=torch.int32, device=flat.device)
        sc = flat.scratch["triton"] = {"sal": torch.zeros(HIST_BINS, **kw), "grow": torch.zeros(HIST_BINS, **kw)}
    return sc


def grad_sumsq(flat, plan: StepPlan) -> float:
    """Pass A over every bucket: G^2 (fixed-order fp64 sum of fp32 block partials) and, on
    pruning steps, the saliency / regrowth histograms of the first digit."""
    sc = _scratch(flat)
    sal, grow = sc["sal"], sc["grow"]
    regrow = plan.prune and plan.regrow_fraction > 0
    if plan.prune:
        sal.zero_()
        if regrow:
            grow.zero_()
    partials = [
        stats(b.g, b.w, b.mask, b.ema, b.n_prunable, plan.prune, regrow, plan.ema_keep, plan.ema_new,
              sal, grow, block=block)
        for b in flat.buckets
    ]
    return float(torch.cat(partials).double().sum())


def _histogram(flat, plan, first: torch.Tensor, saliency: bool, extra: dict):
    """A radix-select histogram source: the cached first digit, then refine passes.

    ``extra`` maps a first-digit bin to a count of entries the kernels leave out, all of
    whose low digits are 0 (exact zeros and +inf).
    """

    def histogram(prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
        if prefix_bits == 0:
            h = first.to(torch.int64).cpu()
            for bin_, count in extra.items():
                h[bin_] += count
            return h
        out = torch.zeros(HIST_BINS, dtype=torch.int32, device=flat.device)
        for b in flat.buckets:
            refine(b.g, b.w, b.mask, b.ema, b.n_prunable, prefix, saliency, plan.ema_keep, plan.ema_new,
                   out, block=block)
        h = out.to(torch.int64).cpu()
        h[0] += extra.get(prefix, 0)
        return h

    return histogram


def select(flat, plan: StepPlan) -> Selection:
    """Exact regrowth threshold, then exact global saliency threshold (SPEC 2.2, 2.3)."""
    sc = _scratch(flat)
    n_active = int(sc["sal"].sum())
    n_pruned = flat.n_prunable - n_active
    regrow_theta, n_regrown = math.inf, 0
    if plan.regrow_fraction > 0:
        n_g, n_keep = regrow_counts(n_pruned, plan.regrow_fraction)
        if n_g > 0 and n_keep == 0:
            regrow_theta, n_regrown = -1.0, n_pruned
        elif n_g > 0:
            regrow_theta, n_le = radix_select_count(n_keep, _histogram(flat, plan, sc["grow"], False, {}))
            n_regrown = n_pruned - n_le
    theta = -1.0
    if plan.k > 0:
        # pruned entries are not in the kernels' saliency histogram: those staying pruned
        # have saliency 0 (bin 0), the regrown ones +inf (INF_BIN)
        extra = {}
        for bin_, count in ((0, n_pruned - n_regrown), (INF_BIN, n_regrown)):
            if count:
                extra[bin_] = extra.get(bin_, 0) + count
        theta = radix_select_count(plan.k, _histogram(flat, plan, sc["sal"], True, extra))[0]
    return Selection(theta=theta, regrow_theta=regrow_theta, n_regrown=n_regrown)


def update(flat, plan: StepPlan) -> None:
    """Pass C over each param group's range of each bucket (SPEC 1.3-1.6)."""
    t = plan.step
    for b in flat.buckets:
        for gi, start, end in b.ranges:
            h = plan.groups[gi]
            update_kernel(
                b.w, b.g, b.m, b.v, b.mask, b.ema, start, end,
                decay=1 - h.lr * h.weight_decay, lerp_weight=1 - h.beta1, beta2=h.beta2,
                step_size=-h.lr / (1 - h.beta1**t), bc2_sqrt=math.sqrt(1 - h.beta2**t), eps=h.eps,
                clip=plan.clip, neg_lr_s=-h.lr * plan.ta_scale, theta=plan.theta, regrow_theta=plan.regrow_theta,
                ema_keep=plan.ema_keep, ema_new=plan.ema_new,
                prunable=end <= b.n_prunable, prune_step=plan.prune, block=block,
            )
