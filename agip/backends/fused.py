"""The host side shared by the fused backends (``triton``, ``cpp``): three passes per
bucket and the exact radix select over their histograms (docs/algorithm.md §2.2, 2.3).

A fused backend supplies three kernels with one signature each:

- ``stats(g, w, v, mask, ema, n_prunable, saliency, regrow, fisher_q, clip, beta2, omb2,
  ema_keep, ema_new, sal_lo, sal_hi, sal_hist, grow_hist)`` -> per-block partial sums of
  (g*M)^2; adds the first-digit (top 16 bits) histograms of the score of active entries
  (bins outside the window ``[sal_lo, sal_hi]`` lumped into ``sal_lo - 1`` and
  ``sal_hi + 1``) and of |g| of pruned entries;
- ``refine(g, w, v, mask, ema, n_prunable, prefix, saliency, fisher_q, clip, beta2, omb2,
  ema_keep, ema_new, hist)``: adds the second-digit histogram of the values in bin ``prefix``;
- ``update(w, g, m, v, mask, ema, start, end, **scalars)``: pass C over one group's range.

The score is Taylor (``fisher_q = -1``) or Fisher ``|w| v_t^(q/4)`` (algorithm.md §2.1b).
The Fisher score needs the clip factor, known only once G^2 is summed, so on Fisher
pruning steps pass A computes G^2 alone and ``select`` runs the stats kernel a second
time for the score's histogram.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from agip.threshold import radix_select_count

from . import Selection, StepPlan, regrow_counts

HIST_BINS = 1 << 16
INF_BIN = 0x7F80  # top 16 bits of +inf: where regrown entries (saliency +inf) sit
FULL = (0, HIST_BINS - 1)
# The saliency window on pruning steps after the first: bins 0 .. (previous theta's bin
# + WINDOW_UP). Pruned entries have saliency 0, so theta is a low quantile of the active
# saliencies, set by how many entries a step prunes: it can fall anywhere, or rise by up
# to an octave (128 bins: 7 mantissa bits per digit), and stay inside. Active entries
# above the window (the bulk) are only counted, not scattered into the histogram.
WINDOW_UP = 128


class _Lump(Exception):
    """The k-th value lies outside the window: redo the first digit in full."""


def keyword_update(ext_update):
    """Adapt a native extension's positional ``update`` to the driver's keyword call."""

    def update(w, g, m, v, mask, ema, start, end, *, decay, lerp_weight, beta2, step_size, bc2_sqrt, eps, clip,
               neg_lr_s, theta, regrow_theta, ema_keep, ema_new, prunable, prune_step, fisher_q):
        ext_update(w, g, m, v, mask, ema, start, end, decay, lerp_weight, beta2, step_size, bc2_sqrt, eps, clip,
                   neg_lr_s, theta, regrow_theta, ema_keep, ema_new, prunable, prune_step, fisher_q)

    return update


class FusedDriver:
    def __init__(self, name, stats, refine, update):
        self.name, self.stats, self.refine, self.update_kernel = name, stats, refine, update

    @classmethod
    def for_extension(cls, name, ext):
        """The driver over a native extension exposing ``stats``, ``refine``, ``update``
        with the signatures of ``csrc/agip_cpu.cpp`` (positional update arguments)."""
        return cls(name, stats=ext.stats, refine=ext.refine, update=keyword_update(ext.update))

    def _scratch(self, flat):
        sc = flat.scratch.get(self.name)
        if sc is None:
            kw = dict(dtype=torch.int32, device=flat.device)
            sc = flat.scratch[self.name] = {"sal": torch.zeros(HIST_BINS, **kw), "grow": torch.zeros(HIST_BINS, **kw)}
        return sc

    def _pass_a(self, flat, plan: StepPlan, window, saliency: bool, regrow: bool) -> float:
        sc = self._scratch(flat)
        if saliency:
            sc["sal"].zero_()
            sc["window"] = window
        if regrow:
            sc["grow"].zero_()
        # the Fisher score's own pass (G^2 already known) walks the prunable segment only
        end = (lambda b: b.n_prunable) if saliency and plan.fisher else (lambda b: b.numel)
        partials = [
            self.stats(b.g[: end(b)], b.w[: end(b)], b.v[: end(b)], b.mask, b.ema, b.n_prunable, saliency, regrow,
                       *plan.score_args(), plan.ema_keep, plan.ema_new, window[0], window[1], sc["sal"], sc["grow"])
            for b in flat.buckets
        ]
        # sharded parameters (FSDP2): the first digits of every rank's entries (algorithm.md §6)
        if saliency:
            flat.comm.sum_counts(sc["sal"])
        if regrow:
            flat.comm.sum_counts(sc["grow"])
        return float(torch.cat([p.double() for p in partials]).sum())

    def _window(self, flat):
        center = self._scratch(flat).get("theta_bin")
        return FULL if center is None else (0, min(HIST_BINS - 1, center + WINDOW_UP))

    def grad_sumsq(self, flat, plan: StepPlan) -> float:
        """Pass A over every bucket: G^2 (fixed-order fp64 sum of per-block partials) and,
        on pruning steps, the first-digit histograms (windowed around the last theta); the
        Fisher score's histogram waits for the clip factor (``select``)."""
        return self._pass_a(flat, plan, self._window(flat), saliency=plan.prune and not plan.fisher,
                            regrow=plan.prune and plan.regrow_fraction > 0)

    def _histogram(self, flat, plan, first: torch.Tensor, saliency: bool, extra: dict, window=FULL):
        """A radix-select histogram source: the cached first digit, then refine passes.

        ``extra`` maps a first-digit bin to a count of entries the kernels leave out, all
        of whose low digits are 0 (exact zeros and +inf). Bins outside ``window`` are
        lumps: selecting one raises :class:`_Lump`.
        """
        lo, hi = window
        lumps = {b for b in (lo - 1, hi + 1) if 0 <= b < HIST_BINS}

        def histogram(prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
            if prefix_bits == 0:
                h = first.to(torch.int64).cpu()
                for bin_, count in extra.items():
                    h[min(max(bin_, lo - 1), hi + 1)] += count  # out-of-window extras join the lumps
                return h
            if prefix in lumps:
                raise _Lump
            out = torch.zeros(HIST_BINS, dtype=torch.int32, device=flat.device)
            for b in flat.buckets:
                self.refine(b.g, b.w, b.v, b.mask, b.ema, b.n_prunable, prefix, saliency, *plan.score_args(),
                            plan.ema_keep, plan.ema_new, out)
            h = flat.comm.sum_counts(out).to(torch.int64).cpu()
            h[0] += extra.get(prefix, 0)
            return h

        return histogram

    def select(self, flat, plan: StepPlan) -> Selection:
        """Exact regrowth threshold, then the exact global saliency threshold (docs/algorithm.md §2.2, 2.3)."""
        sc = self._scratch(flat)
        if plan.fisher:  # the score needs v_t, hence the clip factor: its histogram now
            self._pass_a(flat, plan, self._window(flat), saliency=True, regrow=False)
        n_pruned = flat.n_prunable_global - int(sc["sal"].sum())  # lumps included: every active entry
        regrow_theta, n_regrown = math.inf, 0
        if plan.regrow_fraction > 0:
            n_g, n_keep = regrow_counts(n_pruned, plan.regrow_fraction)
            if n_g > 0 and n_keep == 0:
                regrow_theta, n_regrown = -1.0, n_pruned
            elif n_g > 0:
                regrow_theta, n_le = radix_select_count(n_keep, self._histogram(flat, plan, sc["grow"], False, {}))
                n_regrown = n_pruned - n_le
        theta = -1.0
        if plan.k > 0:
            # pruned entries are not in the kernels' saliency histogram: those staying
            # pruned have saliency 0 (bin 0), the regrown ones +inf (INF_BIN)
            extra = {}
            for bin_, count in ((0, n_pruned - n_regrown), (INF_BIN, n_regrown)):
                if count:
                    extra[bin_] = extra.get(bin_, 0) + count
            try:
                theta = radix_select_count(plan.k, self._histogram(flat, plan, sc["sal"], True, extra, sc["window"]))[0]
            except _Lump:  # theta moved out of the window: the first digit again, in full
                sc["window_misses"] = sc.get("window_misses", 0) + 1
                self._pass_a(flat, plan, FULL, saliency=True, regrow=False)
                theta = radix_select_count(plan.k, self._histogram(flat, plan, sc["sal"], True, extra))[0]
            sc["theta_bin"] = int(np.float32(theta).view(np.uint32)) >> 16
        return Selection(theta=theta, regrow_theta=regrow_theta, n_regrown=n_regrown)

    def update(self, flat, plan: StepPlan) -> None:
        """Pass C over each param group's range of each bucket (docs/algorithm.md §1.3-1.6)."""
        t = plan.step
        for b in flat.buckets:
            for gi, start, end in b.ranges:
                h = plan.groups[gi]
                self.update_kernel(
                    b.w, b.g, b.m, b.v, b.mask, b.ema, start, end,
                    decay=1 - h.lr * h.weight_decay, lerp_weight=1 - h.beta1, beta2=h.beta2,
                    step_size=-h.lr / (1 - h.beta1**t), bc2_sqrt=math.sqrt(1 - h.beta2**t), eps=h.eps,
                    clip=plan.clip, neg_lr_s=-h.lr * plan.ta_scale, theta=plan.theta,
                    regrow_theta=plan.regrow_theta, ema_keep=plan.ema_keep, ema_new=plan.ema_new,
                    prunable=end <= b.n_prunable, prune_step=plan.prune, fisher_q=plan.fisher_q,
                )
