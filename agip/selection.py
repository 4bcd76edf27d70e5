"""Which entries a pruning step keeps: one object per sparsity pattern, each with one
``select`` (docs/algorithm.md §2.2, 2.3 unstructured; §2.5 N:M), so the optimizer's step
has no branch on the pattern.

``select(backend, flat, plan, ratio)`` runs after G^2 (the plan holds the clip factor) and
before the backend's update; it returns a :class:`Decision`, whose ``finish(flat)`` runs
after the update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import nm


@dataclass
class Decision:
    theta: float  # M' = (S > theta); -1 keeps every entry
    n_regrown: int = 0
    masks: Optional[dict] = None  # masks decided outside the update (N:M): bucket id -> bool tensor
    decay: Optional[float] = None  # a number: the masks are candidates, w *= 1 - decay outside them (§2.5b)
    compensate: Optional[object] = None  # agip.obs.Compensation: the OBS update before a cut (§2.6)

    def finish(self, flat) -> None:
        """After the update: apply masks decided outside it (w, m, v * M'; algorithm.md §1.6),
        or, for candidate masks, decay the weights outside them (§2.5b)."""
        if self.masks is None:
            return
        for b in flat.buckets:
            if id(b) in self.masks:
                if self.decay is not None:
                    w = b.w[: b.n_prunable]
                    w.copy_(torch.where(self.masks[id(b)], w, w * (1.0 - self.decay)))
                else:
                    if self.compensate is not None:
                        self.compensate(b, self.masks[id(b)])
                    flat.apply_mask(b, self.masks[id(b)])


class Unstructured:
    """One global threshold theta over every prunable entry; the backend finds it, and its
    fused update applies the new mask (algorithm.md §2.2, 2.3)."""

    in_update = True  # the backend's update computes M'

    def select(self, backend, flat, plan, ratio: float) -> Decision:
        sel = backend.select(flat, plan)
        plan.theta, plan.regrow_theta = sel.theta, sel.regrow_theta
        return Decision(theta=sel.theta, n_regrown=sel.n_regrown)


class NM:
    """N of every M consecutive weights along the input (algorithm.md §2.5): one PyTorch pass
    shared by every backend picks the groups; the backend's update then prunes nothing, and
    the masks are applied after it, as a fused update would."""

    in_update = False

    def __init__(self, flat, n: int, m: int, input_power: float = 0.0, compensate: bool = False):
        if flat.comm.sharded:
            raise ValueError("sparsity_pattern N:M is not supported on FSDP2 shards yet: use DDP, or 'unstructured'")
        nm.check_layout(flat, m)
        self.n, self.m, self.groups = n, m, nm.groups_total(flat, m)
        self.input_power, self.wants_compensation = input_power, compensate
        self.input_norms = None  # param id -> ||X_j|| over its input dimension (§2.5c), set by AGIP.set_input_norms
        self.scales = None  # param id -> ||X_j||^q in fp32
        self.compensation = None  # agip.obs.Compensation (compensate='obs'), set by AGIP.track_inputs

    def set_input_norms(self, norms: dict) -> None:
        self.input_norms = norms
        self.scales = {key: norm.float().pow(self.input_power) for key, norm in norms.items()}

    def _select(self, flat, plan, k: int):
        if self.input_power > 0 and self.scales is None:
            raise RuntimeError("nm_input_power > 0 scores each weight by its input's norm (algorithm.md §2.5c): call "
                               "opt.set_input_norms(agip.baselines.input_norms(model, opt, calibration_batches)) "
                               "before the first pruning step")
        if self.wants_compensation and self.compensation is None:
            raise RuntimeError("compensate='obs' needs the layer inputs' second moment (algorithm.md §2.6): call "
                               "opt.track_inputs(model) before the first forward of training")
        return nm.select(flat, plan, self.n, self.m, k, self.scales)

    def select(self, backend, flat, plan, ratio: float) -> Decision:
        k = nm.groups_to_prune(ratio, self.n, self.m, self.groups)
        if self.settled(flat, k):
            return Decision(theta=0.0)
        masks, theta = self._select(flat, plan, k)
        return Decision(theta=theta, masks=masks, compensate=self.compensation)

    def settled(self, flat, k: int) -> bool:
        """Whether the step asks for every group and every group has exactly N entries pruned
        already: then the selection would return the masks as they are (those N come first,
        at cost 0) and theta = 0, so it is skipped (a quarter of a default run's steps)."""
        return k >= self.groups and nm.settled(flat, self.n, self.m)


class NMDecay(NM):
    """N:M masks that may change (algorithm.md §2.5b): until R_t reaches the target, every
    pruning step re-chooses the N of M entries of smallest score in each of the groups the
    target asks for, and decays those weights (``w *= 1 - nm_decay · R_t / R_target``)
    instead of zeroing them, so gradients, m and v keep flowing to them and a weight whose
    score rises wins its place back; the step that reaches the target cuts them, and from
    then on the masks stay fixed (as in :class:`NM`)."""

    def __init__(self, flat, n: int, m: int, target: float, decay: float, input_power: float = 0.0,
                 compensate: bool = False):
        super().__init__(flat, n, m, input_power, compensate)
        self.target, self.decay, self.k_final = target, decay, nm.groups_to_prune(target, n, m, self.groups)

    def select(self, backend, flat, plan, ratio: float) -> Decision:
        hard = ratio >= self.target  # the end of the ramp (the final pruning step snaps R_t to it)
        if hard and self.settled(flat, self.k_final):
            return Decision(theta=0.0)
        masks, theta = self._select(flat, plan, self.k_final)
        return Decision(theta=theta, masks=masks, decay=None if hard else self.decay * ratio / self.target,
                        compensate=self.compensation if hard else None)


def make(flat, config):
    """The selection of ``config.sparsity_pattern`` (and ``nm_mode``)."""
    pattern = config.nm
    if pattern is None:
        return Unstructured()
    obs = config.compensate == "obs"
    if config.nm_mode == "decay":
        return NMDecay(flat, *pattern, config.target_sparsity, config.nm_decay, config.nm_input_power, obs)
    return NM(flat, *pattern, config.nm_input_power, obs)
