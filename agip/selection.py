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

from . import nm


@dataclass
class Decision:
    theta: float  # M' = (S > theta); -1 keeps every entry
    n_regrown: int = 0
    masks: Optional[dict] = None  # masks decided outside the update (N:M): bucket id -> bool tensor

    def finish(self, flat) -> None:
        """After the update: apply masks decided outside it (w, m, v * M'; algorithm.md §1.6)."""
        if self.masks is not None:
            for b in flat.buckets:
                if id(b) in self.masks:
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

    def __init__(self, flat, n: int, m: int):
        if flat.comm.sharded:
            raise ValueError("sparsity_pattern N:M is not supported on FSDP2 shards yet: use DDP, or 'unstructured'")
        nm.check_layout(flat, m)
        self.n, self.m, self.groups = n, m, nm.groups_total(flat, m)

    def select(self, backend, flat, plan, ratio: float) -> Decision:
        masks, theta = nm.select(flat, plan, self.n, self.m, nm.groups_to_prune(ratio, self.n, self.m, self.groups))
        return Decision(theta=theta, masks=masks)


def make(flat, config):
    """The selection of ``config.sparsity_pattern``."""
    pattern = config.nm
    return NM(flat, *pattern) if pattern else Unstructured()
