"""N:M semi-structured sparsity (docs/algorithm.md §2.5; 2:4 is what GPU sparse tensor cores run).

In every group of M consecutive weights along a layer's input dimension, N are pruned. The
saliency is the unstructured mode's (Taylor or Fisher, algorithm.md §2.1, §2.1b); the
schedule ramps the share of groups that are N:M-pruned:

- a group's cost is the sum of its N smallest saliencies (added in increasing order, in
  fp32): what pruning that group would remove;
- on a pruning step with R_t, the ``k = floor(R_t / (N/M) * G)`` groups of lowest cost (of
  all G groups of the model; exact global threshold theta on the costs, the k-th smallest)
  are pruned: their N entries of smallest saliency get mask 0 (ties: the entries pruned
  already first, then the lower index). A pruned group's cost is 0, so it stays pruned.

The selection is one PyTorch pass over the prunable segment shared by every backend (the
backends' own update then runs as on a step that prunes nothing, and the new mask is
applied after it, as the fused update would): the masks are the same in every backend by
construction.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple

import torch

from .backends import reference


def parse(pattern: str) -> Optional[Tuple[int, int]]:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 1 <= N < M."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern) if isinstance(pattern, str) else None
    if m is None:
        raise ValueError(f"sparsity_pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise ValueError(f"sparsity_pattern {pattern!r}: need 1 <= N < M (N of every M weights are pruned)")
    return n, mm


def _grouped(x: torch.Tensor, shape: tuple, input_dim: int, m: int) -> torch.Tensor:
    """A parameter's flat slice ``x`` as rows of M consecutive entries along ``input_dim``
    (a copy when the input dimension is not the last one)."""
    t = x.view(shape).movedim(input_dim, -1)
    return t.reshape(-1, m)


def _ungroup(g: torch.Tensor, shape: tuple, input_dim: int) -> torch.Tensor:
    moved = list(shape)
    moved.append(moved.pop(input_dim))
    return g.reshape(moved).movedim(-1, input_dim).reshape(-1)


def check_layout(flat, m: int) -> None:
    """Every prunable weight needs an input size divisible by M (before any step)."""
    for b, s in flat.prunable_slots():
        dim = s.input_dim
        if len(s.shape) < 2 or s.shape[dim] % m:
            raise ValueError(
                f"sparsity_pattern N:{m}: {s.name!r} has shape {s.shape}, whose input dimension ({dim}) is not "
                f"divisible by {m}; leave it out of the prunable set (agip.param_groups(..., exclude=...)) or "
                "use sparsity_pattern='unstructured'"
            )


def groups_total(flat, m: int) -> int:
    return sum(s.numel // m for _, s in flat.prunable_slots())


def scaled(score: torch.Tensor, shape: tuple, input_dim: int, scale: torch.Tensor) -> torch.Tensor:
    """A parameter's flat score slice times ``scale[j]``, j its index along ``input_dim``
    (algorithm.md §2.5c: S_ij · ||X_j||^q), in fp32 (one rounding per entry)."""
    view = [1] * len(shape)
    view[input_dim] = -1
    return (score.view(shape) * scale.view(view)).reshape(-1)


def select(flat, plan, n: int, m: int, k: int, scales: Optional[dict] = None):
    """The new masks (one bool tensor per bucket, over its prunable segment) and theta, the
    cost of the k-th cheapest group (algorithm.md §2.5), from pre-update w, g, v. ``scales``
    (param id -> fp32 vector over its input dimension) multiplies each score by its input's
    factor first (§2.5c)."""
    per_slot, scores = [], {}
    for b, s in flat.prunable_slots():
        if id(b) not in scores:
            # the unstructured score; torch's own sqrt (in place on the score's own temporary),
            # not the correctly rounded one the fused kernels need: every backend shares this
            # pass (and it is 100x faster on the CPU)
            scores[id(b)] = reference.saliency(b, plan, sqrt=torch.Tensor.sqrt_)
        score = scores[id(b)]
        sl = slice(s.start, s.start + s.numel)
        part = score[sl] if scales is None else scaled(score[sl], s.shape, s.input_dim, scales[id(s.param)])
        sg = _grouped(part, s.shape, s.input_dim, m)
        active = _grouped(b.mask[sl], s.shape, s.input_dim, m)
        # order inside a group: pruned entries first, then by score, then by index
        ranks = _ranks(torch.where(active, sg, -1.0))
        cost = None
        for r in range(n):  # fp32 additions in increasing order: every platform alike
            at = (ranks == r).to(torch.uint8).argmax(dim=1, keepdim=True)  # the one entry of rank r
            v = torch.gather(sg, 1, at).squeeze(1)
            cost = v if cost is None else cost + v
        per_slot.append((b, s, ranks < n, cost))
    theta = -1.0
    if k > 0:
        theta = reference.kth_smallest(torch.cat([c for *_, c in per_slot]), k, flat.comm)
    masks = {id(b): b.mask.clone() for b in flat.buckets if b.n_prunable}
    if k == 0:  # nothing asked for yet: the masks stay as they are (set by apply_masks, a one-shot start)
        return masks, theta
    for b, s, first, cost in per_slot:
        keep = ~(first & (cost <= theta)[:, None])
        masks[id(b)][s.start : s.start + s.numel] = _ungroup(keep, s.shape, s.input_dim)
    return masks, theta


def _ranks(key: torch.Tensor) -> torch.Tensor:
    """Each entry's place in the stable ascending order of its row (0 = smallest; ties: the
    lower index first), from M² comparisons: on the CPU several times faster than a sort of
    rows of M entries (measured 7x for 2:4), with the very same order."""
    m = key.shape[1]
    ranks = torch.zeros(key.shape, dtype=torch.uint8, device=key.device)
    for j in range(m):
        col = key[:, j]
        for i in range(m):
            if i != j:  # i comes before j: smaller, or equal with a lower index
                ranks[:, j] += (key[:, i] <= col) if i < j else (key[:, i] < col)
    return ranks


def settled(flat, n: int, m: int) -> bool:
    """Whether every group of every prunable weight has exactly N entries pruned."""
    for b, s in flat.prunable_slots():
        kept = _grouped(b.mask[s.start : s.start + s.numel], s.shape, s.input_dim, m).sum(dim=1)
        if not bool((kept == m - n).all()):
            return False
    return True


def groups_to_prune(ratio: float, n: int, m: int, total: int) -> int:
    """k = floor(R_t / (N/M) * G): the share of groups the schedule asks for."""
    return min(total, int(math.floor(ratio * m * total / n))) if ratio > 0 else 0


# --- running a 2:4 model on sparse tensor cores -------------------------------------------
def semi_structured_unsupported() -> Optional[str]:
    """None where torch runs 2:4 sparse matrix products (CUDA, compute capability >= 8.0),
    else why not, in one line."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here: 2:4 sparse tensor cores need an NVIDIA GPU of compute capability >= 8.0 (Ampere+)"
    cc = torch.cuda.get_device_capability()
    if cc < (8, 0):
        return (f"{torch.cuda.get_device_name()} has compute capability {cc[0]}.{cc[1]}: 2:4 sparse tensor cores need "
                ">= 8.0 (Ampere or newer; a T4 is 7.5)")
    return None


def is_24(weight: torch.Tensor) -> bool:
    """Whether an nn.Linear weight (out, in) has at most 2 non-zeros in every 4 along its input."""
    return weight.ndim == 2 and weight.shape[1] % 4 == 0 and bool(
        (weight.detach().reshape(-1, 4) != 0).sum(dim=1).le(2).all())


def to_semi_structured(model) -> int:
    """Swap the weight of every 2:4 ``nn.Linear`` for torch's semi-structured sparse layout
    (``torch.sparse.to_sparse_semi_structured``; fp16/bf16 on CUDA). Returns how many; a
    layer whose shape the sparse kernels refuse stays dense."""
    from torch import nn
    from torch.sparse import to_sparse_semi_structured

    done = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and is_24(module.weight):
            try:
                sparse = to_sparse_semi_structured(module.weight.detach())
            except (RuntimeError, ValueError):  # e.g. a size the CUTLASS/cuSPARSELt kernels do not take
                continue
            module.weight = nn.Parameter(sparse, requires_grad=False)
            done += 1
    return done


def nm_of(pattern: str, ratio: float):
    """(N, M) of an N:M ``pattern`` whose ratio the target matches, None for 'unstructured'."""
    n_m = parse(pattern)
    if n_m is not None and abs(ratio - n_m[0] / n_m[1]) > 1e-9:
        raise ValueError(f"a one-shot {pattern} mask prunes {n_m[0]}/{n_m[1]} of the weights: pass "
                         f"--target-sparsity {n_m[0] / n_m[1]:g} (got {ratio:g})")
    return n_m
