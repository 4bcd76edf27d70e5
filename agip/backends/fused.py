"""The host side shared by the fused backends (``triton``, ``cpp``): three passes per
bucket and the exact radix select over their histograms (docs/algorithm.md §2.2, 2.3).

A fused backend supplies a :class:`Kernels` bundle with one signature per pass:

- ``stats(g, w, v, mask, ema, n_prunable, saliency, regrow, *ScoreArgs, sal_lo, sal_hi,
  sal_hist, grow_hist[, with_sumsq, cand, cand_n, cand_lo, cand_hi])`` -> per-block partial
  sums of (g*M)^2; adds the first-digit (top 16 bits) histograms of the score of active
  entries (bins outside the window ``[sal_lo, sal_hi]`` lumped into ``sal_lo - 1`` and
  ``sal_hi + 1``) and of |g| of pruned entries. A backend whose ``candidates`` flag is set
  (``cpp``) takes the five bracketed arguments too: it skips G^2 when told to and writes
  the keys of the scores whose first digit lies in ``[cand_lo, cand_hi]`` to ``cand``
  (their number, or -1 if they did not fit, to ``cand_n``), and its ``refine_keys(cand,
  n, prefix, hist)`` then gives a second digit in that band without a pass over the buckets;
- ``refine(g, w, v, mask, ema, n_prunable, prefix, saliency, *ScoreArgs, hist)``: adds the
  second-digit histogram of the values in bin ``prefix``;
- ``update(w, g, m, v, mask, ema, start, end, args, ahead)``: pass C over one group's
  range, with ``args`` an :class:`~agip.backends.UpdateArgs`. With ``ahead = (hist, lo, hi,
  cand, cand_n, cand_lo, cand_hi)`` (else None) for a prunable range it also adds the first-digit histogram of the *next* step's score
  (the Fisher score of v_(t-1), which the values it writes determine) of the entries that
  stay active over the window ``[lo, hi]``, and with ``cand`` appends the keys in
  ``[cand_lo, cand_hi]`` (``cand_n``: the count so far; -1 once they did not fit).

The score is Taylor (``fisher_q = -1``) or Fisher ``|w| v_t^(q/4)`` (algorithm.md §2.1b).
The Fisher score of v_t needs the clip factor, known only once G^2 is summed, so on its
pruning steps pass A computes G^2 alone and ``select`` runs the stats kernel a second
time for the score's histogram; the Fisher score of v_(t-1) (``fisher_moment="previous"``)
is histogrammed in pass A, as Taylor's is, or, when the plan says so, by the previous step's
update ("scores ahead", docs/design.md): that update wrote w and v, so it knows this step's
scores, and this step's pass A reads g and the mask only, as a non-pruning one does. The
driver's own state (histograms, the window around the previous theta, the kept band,
counters) is a :class:`DriverState` in ``flat.scratch``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from agip.threshold import radix_select_count

from . import Selection, StepPlan, UpdateArgs, regrow_counts

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
# up to a quarter of the prunable entries (int32: 1 B per prunable parameter: with an eighth,
# a steep ramp's band overflowed on 3 of 7 steps and each ran a refine pass, on a Zen 5
# 1.36-1.40x fused AdamW + clip against 1.01-1.07x); more keys than that, or theta outside
# the band, and the refine pass runs as before.
BAND_MARGIN = 8
CANDIDATE_SHARE, CANDIDATE_MIN = 4, 1 << 12


class _Lump(Exception):
    """The k-th value lies outside the window: redo the first digit in full."""


@dataclass
class Kernels:
    """A fused backend's passes (signatures in the module docstring) and its capabilities."""

    stats: Callable
    refine: Callable
    update: Callable
    refine_keys: Optional[Callable] = None
    candidates: bool = False  # stats collects candidate keys, and refine_keys reads them

    def __post_init__(self):
        if self.candidates != (self.refine_keys is not None):
            raise ValueError("a backend that collects candidates (candidates=True) supplies refine_keys, and only it")


@dataclass
class DriverState:
    """What the driver keeps between passes and steps, per flat state (``flat.scratch[name]``)."""

    sal: torch.Tensor  # first-digit histogram of the active entries' scores (int32, HIST_BINS)
    grow: torch.Tensor  # first-digit histogram of |g| of pruned entries
    window: Tuple[int, int] = FULL  # the score bins pass A histogrammed this step
    band: Optional[Tuple[int, int]] = None  # the bins whose keys pass A kept (candidates)
    cand: Optional[List[tuple]] = None  # (keys, count) per bucket, when every bucket's fitted
    theta_bin: Optional[int] = None  # the first digit of the previous theta
    theta_moved: Optional[int] = None  # how far it moved at the previous pruning step
    cand_buf: Optional[torch.Tensor] = None  # kept: allocating it each step costs more in page faults
    cand_caps: Optional[List[int]] = None
    ahead_step: Optional[int] = None  # sal, window, band and cand hold this step's scores, made ahead
    band_hits: int = 0  # counters for tests and benchmarks
    window_misses: int = 0
    ahead_hits: int = 0  # pruning steps whose first digit the previous update histogrammed

    def forget_theta(self) -> None:
        """As before a first pruning step: no previous theta, a full first-digit histogram."""
        self.theta_bin = self.theta_moved = None

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.sal, self.grow, self.cand_buf) if t is not None)


class FusedDriver:
    def __init__(self, name: str, kernels: Kernels):
        self.name, self.k = name, kernels

    def state(self, flat) -> DriverState:
        st = flat.scratch.get(self.name)
        if st is None:
            kw = dict(dtype=torch.int32, device=flat.device)
            st = flat.scratch[self.name] = DriverState(torch.zeros(HIST_BINS, **kw), torch.zeros(HIST_BINS, **kw))
        return st

    def _candidate_buffers(self, flat):
        """One int32 buffer per bucket for the keys pass A collects."""
        st = self.state(flat)
        if st.cand_buf is None:
            st.cand_caps = [max(CANDIDATE_MIN, b.n_prunable // CANDIDATE_SHARE) for b in flat.buckets]
            st.cand_buf = torch.empty(sum(st.cand_caps), dtype=torch.int32)
        return list(torch.split(st.cand_buf, st.cand_caps))

    def _open_window(self, flat, window, saliency: bool) -> list:
        """Start a first-digit histogram of the score over ``window`` (pass A's, or the
        update's for the next step): zero it, choose the kept band; returns per bucket the
        (keys buffer, count) the kernels fill, or (None, None)."""
        st = self.state(flat)
        band = self._band(st, window) if saliency and self.k.candidates else None
        if saliency:
            st.sal.zero_()
            st.window, st.band, st.cand, st.ahead_step = window, band, None, None
        bufs = self._candidate_buffers(flat) if band else [None] * len(flat.buckets)
        return [(buf, torch.zeros(1, dtype=torch.int64) if buf is not None else None) for buf in bufs]

    def _close_window(self, flat, cands: list) -> None:
        """Keep the band's keys if every bucket's fitted; sum the counts over ranks."""
        st = self.state(flat)
        if st.band and all(int(n) >= 0 for _, n in cands):
            st.cand = [(buf, int(n)) for buf, n in cands]
        # sharded parameters (FSDP2): the first digits of every rank's entries (algorithm.md §6)
        flat.comm.sum_counts(st.sal)

    def _pass_a(self, flat, plan: StepPlan, window, saliency: bool, regrow: bool, sumsq: bool = True) -> float:
        st = self.state(flat)
        cands = self._open_window(flat, window, saliency)
        if regrow:
            st.grow.zero_()
        # a pass for the score alone (G^2 already known) walks the prunable segment only
        end = (lambda b: b.numel) if sumsq else (lambda b: b.n_prunable)
        partials = []
        for b, (buf, n) in zip(flat.buckets, cands):
            extra = (sumsq, buf, n, *((st.band if saliency else None) or (0, -1))) if self.k.candidates else ()
            partials.append(self.k.stats(b.g[: end(b)], b.w[: end(b)], b.v[: end(b)], b.mask, b.ema, b.n_prunable,
                                         saliency, regrow, *plan.score_args(), window[0], window[1], st.sal, st.grow,
                                         *extra))
        if saliency:
            self._close_window(flat, cands)
        if regrow:
            flat.comm.sum_counts(st.grow)
        return float(torch.cat([p.double() for p in partials]).sum()) if sumsq else 0.0

    @staticmethod
    def _window(st: DriverState):
        if st.theta_bin is None:
            return FULL
        up = WINDOW_UP if st.theta_moved is None else WINDOW_MARGIN + 2 * max(st.theta_moved, 0)
        return 0, min(HIST_BINS - 1, st.theta_bin + up)

    @staticmethod
    def _band(st: DriverState, window):
        """The first-digit bins whose keys pass A collects: from half of theta's last move to
        one and a half times it, plus BAND_MARGIN either side (inside the window); None on a
        full pass."""
        center, moved = st.theta_bin, st.theta_moved
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
        st = self.state(flat)
        # scores ahead: the previous update histogrammed this step's scores from the values it wrote
        ahead = plan.prune and plan.ahead_valid and st.ahead_step == plan.step
        st.ahead_hits += ahead
        return self._pass_a(flat, plan, self._window(st), saliency=plan.prune and not plan.score_needs_clip and not ahead,
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
            st = self.state(flat)
            out = torch.zeros(HIST_BINS, dtype=torch.int32, device=flat.device)
            if saliency and st.cand is not None and st.band[0] <= prefix <= st.band[1]:
                st.band_hits += 1
                for keys, n in st.cand:  # pass A kept every key of bin `prefix`
                    self.k.refine_keys(keys, n, prefix, out)
            else:
                for b in flat.buckets:
                    self.k.refine(b.g, b.w, b.v, b.mask, b.ema, b.n_prunable, prefix, saliency, *plan.score_args(),
                                  out)
            h = flat.comm.sum_counts(out).to(torch.int64).cpu()
            h[0] += extra.get(prefix, 0)
            return h

        return histogram

    def select(self, flat, plan: StepPlan) -> Selection:
        """Exact regrowth threshold, then the exact global saliency threshold (docs/algorithm.md §2.2, 2.3)."""
        st = self.state(flat)
        if plan.score_needs_clip:  # the score needs v_t, hence the clip factor: its histogram now
            self._pass_a(flat, plan, self._window(st), saliency=True, regrow=False, sumsq=False)
        n_pruned = flat.n_prunable_global - int(st.sal.sum())  # lumps included: every active entry
        regrow_theta, n_regrown = math.inf, 0
        if plan.regrow_fraction > 0:
            n_g, n_keep = regrow_counts(n_pruned, plan.regrow_fraction)
            if n_g > 0 and n_keep == 0:
                regrow_theta, n_regrown = -1.0, n_pruned
            elif n_g > 0:
                regrow_theta, n_le = radix_select_count(n_keep, self._histogram(flat, plan, st.grow, False, {}))
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
                    theta = radix_select_count(plan.k, self._histogram(flat, plan, st.sal, True, extra, st.window))[0]
                except _Lump:  # theta moved out of the window: the first digit again, in full
                    st.window_misses += 1
                    self._pass_a(flat, plan, FULL, saliency=True, regrow=False, sumsq=False)
                    theta = radix_select_count(plan.k, self._histogram(flat, plan, st.sal, True, extra))[0]
            new_bin = int(np.float32(theta).view(np.uint32)) >> 16
            st.theta_moved = None if st.theta_bin is None else new_bin - st.theta_bin
            st.theta_bin = new_bin
        return Selection(theta=theta, regrow_theta=regrow_theta, n_regrown=n_regrown)

    def update(self, flat, plan: StepPlan) -> None:
        """Pass C over each param group's range of each bucket (docs/algorithm.md §1.3-1.6);
        with ``plan.score_ahead``, also the first digits of the next step's scores, over the
        window and band the next pass A would use (this step's theta is known by now)."""
        st = self.state(flat)
        ahead = plan.score_ahead
        st.ahead_step = None
        window = self._window(st)
        cands = self._open_window(flat, window, saliency=True) if ahead else [(None, None)] * len(flat.buckets)
        for b, (buf, n) in zip(flat.buckets, cands):
            for gi, start, end in b.ranges:
                prunable = end <= b.n_prunable
                args = UpdateArgs.of(plan, plan.groups[gi], prunable=prunable)
                spec = (st.sal, *window, buf, n, *(st.band or (0, -1))) if ahead and prunable else None
                self.k.update(b.w, b.g, b.m, b.v, b.mask, b.ema, start, end, args, spec)
        if ahead:
            self._close_window(flat, cands)
            st.ahead_step = plan.step + 1
