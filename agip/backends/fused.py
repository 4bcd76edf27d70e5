"""The host side shared by the fused backends (``triton``, ``cpp``): three passes per
bucket and the exact radix select over their histograms (docs/algorithm.md §2.2, 2.3).

A fused backend supplies three kernels with one signature each:

- ``stats(g, w, v, mask, ema, n_prunable, saliency, regrow, fisher_q, clip, beta2, omb2,
  ema_keep, ema_new, sal_lo, sal_hi, sal_hist, grow_hist)`` -> per-block partial sums of
  (g*M)^2; adds the first-digit (top 16 bits) histograms of the score of active entries
  (bins outside the window ``[sal_lo, sal_hi]`` lumped into ``sal_lo - 1`` and
  ``sal_hi + 1``) and of |g| of pruned entries. A backend that also supplies
  ``refine_keys(cand, n, prefix, hist)`` (``cpp``) *collects candidates*: its ``stats``
  takes five more arguments, ``with_sumsq, cand, cand_n, cand_lo, cand_hi``; it skips G^2
  when told to and writes the keys of the scores whose first digit lies in
  ``[cand_lo, cand_hi]`` to ``cand`` (their number, or -1 if they did not fit, to
  ``cand_n``), so a second digit in that band needs no ``refine`` pass over the buckets;
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
# The saliency window on pruning steps after the first: bins 0 .. (previous theta's bin +
# up). Pruned entries have saliency 0, so theta is a low quantile of the active saliencies,
# set by how many entries a step prunes: it can fall anywhere (a noisy score's low tail),
# and on a ramp it rises by less each step (a cubic ramp prunes fewer entries each step).
# up is WINDOW_UP bins (one octave: 7 mantissa bits per digit) after a first pruning step,
# then twice theta's last rise plus WINDOW_MARGIN. Active entries above the window (the
# bulk) are only counted, not scattered into the histogram; theta landing above it costs
# one more full pass (a miss).
WINDOW_UP, WINDOW_MARGIN = 128, 16
# Pass A of a backend that collects candidates (cpp) also keeps the keys of the scores in a
# narrower band of first-digit bins, where theta's last move predicts it (BAND_MARGIN
# around [half the move, 1.5 times it]); if theta's first digit lands there, its second
# digit comes from those keys instead of a refine pass over the buckets. The buffer holds
# up to an eighth of the prunable entries (int32: 0.5 B per prunable parameter); more keys
# than that, or theta outside the band, and the refine pass runs as before.
BAND_MARGIN = 8
CANDIDATE_SHARE, CANDIDATE_MIN = 8, 1 << 12


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
    def __init__(self, name, stats, refine, update, refine_keys=None):
        self.name, self.stats, self.refine, self.update_kernel = name, stats, refine, update
        # refine_keys(cand, n, prefix, hist): pass B over the keys stats collected
        self.refine_keys = refine_keys

    @property
    def candidates(self) -> bool:
        """Whether ``stats`` collects candidate keys (the backend supplies ``refine_keys``)."""
        return self.refine_keys is not None

    @classmethod
    def for_extension(cls, name, ext):
        """The driver over a native extension exposing ``stats``, ``refine``, ``update``
        (and optionally ``refine_keys``) with the signatures of ``csrc/agip_cpu.cpp``
        (positional update arguments)."""
        return cls(name, stats=ext.stats, refine=ext.refine, update=keyword_update(ext.update),
                   refine_keys=getattr(ext, "refine_keys", None))

    def _scratch(self, flat):
        sc = flat.scratch.get(self.name)
        if sc is None:
            kw = dict(dtype=torch.int32, device=flat.device)
            sc = flat.scratch[self.name] = {"sal": torch.zeros(HIST_BINS, **kw), "grow": torch.zeros(HIST_BINS, **kw)}
        return sc

    def _candidate_buffers(self, flat):
        """One int32 buffer per bucket for the keys pass A collects (kept: allocating it each
        step costs more in page faults than the pass saves)."""
        sc = self._scratch(flat)
        if "cand_buf" not in sc:
            caps = [max(CANDIDATE_MIN, b.n_prunable // CANDIDATE_SHARE) for b in flat.buckets]
            sc["cand_buf"] = torch.empty(sum(caps), dtype=torch.int32)
            sc["cand_caps"] = caps
        return list(torch.split(sc["cand_buf"], sc["cand_caps"]))

    def _pass_a(self, flat, plan: StepPlan, window, saliency: bool, regrow: bool, sumsq: bool = True) -> float:
        sc = self._scratch(flat)
        band = self._band(flat, window) if saliency and self.candidates else None
        if saliency:
            sc["sal"].zero_()
            sc["window"], sc["band"], sc["cand"] = window, band, None
        if regrow:
            sc["grow"].zero_()
        # a pass for the score alone (G^2 already known) walks the prunable segment only
        end = (lambda b: b.numel) if sumsq else (lambda b: b.n_prunable)
        bufs = self._candidate_buffers(flat) if band else [None] * len(flat.buckets)
        partials, cands = [], []
        for b, buf in zip(flat.buckets, bufs):
            extra = ()
            if self.candidates:
                n = torch.zeros(1, dtype=torch.int64) if buf is not None else None
                cands.append((buf, n))
                extra = (sumsq, buf, n, *(band or (0, -1)))
            partials.append(self.stats(b.g[: end(b)], b.w[: end(b)], b.v[: end(b)], b.mask, b.ema, b.n_prunable,
                                       saliency, regrow, *plan.score_args(), plan.ema_keep, plan.ema_new, window[0],
                                       window[1], sc["sal"], sc["grow"], *extra))
        if band and all(int(n) >= 0 for _, n in cands):
            sc["cand"] = [(buf, int(n)) for buf, n in cands]
        # sharded parameters (FSDP2): the first digits of every rank's entries (algorithm.md §6)
        if saliency:
            flat.comm.sum_counts(sc["sal"])
        if regrow:
            flat.comm.sum_counts(sc["grow"])
        return float(torch.cat([p.double() for p in partials]).sum()) if sumsq else 0.0

    def _window(self, flat):
        sc = self._scratch(flat)
        center, moved = sc.get("theta_bin"), sc.get("theta_moved")
        if center is None:
            return FULL
        up = WINDOW_UP if moved is None else WINDOW_MARGIN + 2 * max(moved, 0)
        return 0, min(HIST_BINS - 1, center + up)

    def _band(self, flat, window):
        """The first-digit bins whose keys pass A collects: from half of theta's last move to
        one and a half times it, plus BAND_MARGIN either side (inside the window); None on a
        full pass."""
        sc = self._scratch(flat)
        center, moved = sc.get("theta_bin"), sc.get("theta_moved")
        if window == FULL or center is None:
            return None
        if moved is None:
            return window
        lo, hi = sorted((center + moved // 2, center + (3 * moved) // 2))
        return max(window[0], lo - BAND_MARGIN), min(window[1], hi + BAND_MARGIN)

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
            sc = self._scratch(flat)
            out = torch.zeros(HIST_BINS, dtype=torch.int32, device=flat.device)
            if saliency and sc.get("cand") is not None and sc["band"][0] <= prefix <= sc["band"][1]:
                sc["band_hits"] = sc.get("band_hits", 0) + 1
                for keys, n in sc["cand"]:  # pass A kept every key of bin `prefix`
                    self.refine_keys(keys, n, prefix, out)
            else:
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
            self._pass_a(flat, plan, self._window(flat), saliency=True, regrow=False, sumsq=False)
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
            if plan.k <= n_pruned - n_regrown:
                theta = 0.0  # the k-th smallest is one of the zeros of the entries staying pruned
            else:
                try:
                    theta = radix_select_count(plan.k, self._histogram(flat, plan, sc["sal"], True, extra,
                                                                       sc["window"]))[0]
                except _Lump:  # theta moved out of the window: the first digit again, in full
                    sc["window_misses"] = sc.get("window_misses", 0) + 1
                    self._pass_a(flat, plan, FULL, saliency=True, regrow=False, sumsq=False)
                    theta = radix_select_count(plan.k, self._histogram(flat, plan, sc["sal"], True, extra))[0]
            new_bin = int(np.float32(theta).view(np.uint32)) >> 16
            old_bin = sc.get("theta_bin")
            sc["theta_moved"] = None if old_bin is None else new_bin - old_bin
            sc["theta_bin"] = new_bin
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
