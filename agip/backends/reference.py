"""Reference backend: plain PyTorch, written to be obviously right (docs/algorithm.md §1-2).

Every other backend is tested against this one. Math is in fp32 (fp64 for G^2); the
AdamW lines mirror ``torch.optim.AdamW``'s single-tensor code line by line, so that with
no pruning and no TA the step equals it to fp32 rounding.
"""
from __future__ import annotations

import math

import torch

from agip.threshold import radix_select, torch_histogram

from . import Selection, StepPlan, regrow_counts


def kth_smallest(values: torch.Tensor, k: int, comm=None) -> float:
    """The exact k-th smallest value (1-based) of ``values`` (docs/algorithm.md §2.3).

    ``torch.kthvalue`` is a selection: it returns one of the input elements and does no
    arithmetic on them, so the result is exact (ties, zeros and +inf included).

    With a sharded ``comm`` (FSDP2; algorithm.md §6) ``values`` is this rank's part, and
    the k-th smallest of all ranks' values is found by radix select over histograms summed
    across ranks (exact too: integer counts).
    """
    if comm is not None and comm.active and comm.sharded:
        local_hist = torch_histogram(values.contiguous())
        return radix_select(k, lambda *a: comm.sum_counts(local_hist(*a).to(values.device)))
    if not 1 <= k <= values.numel():
        raise ValueError(f"k must be in [1, {values.numel()}], got {k}")
    return float(torch.kthvalue(values, k).values)


def grad_sumsq(flat, plan: StepPlan) -> float:
    """Pass A: G^2 = sum (g*M)^2 + sum g^2 (docs/algorithm.md §1.2), accumulated in fp64."""
    total = 0.0
    for b in flat.buckets:
        P = b.n_prunable
        gp = b.g[:P].float() * b.mask
        total += float(torch.sum(gp * gp, dtype=torch.float64))
        rest = b.g[P:].float()
        total += float(torch.sum(rest * rest, dtype=torch.float64))
    return total


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root of a non-negative fp32 tensor (IEEE 754's
    sqrt, which C++ ``std::sqrt``, CUDA ``__fsqrt_rn`` and Triton ``sqrt_rn`` compute).

    ``torch.sqrt`` on the CPU is not always correctly rounded (in torch 2.13 about one fp32
    result in five differs by an ulp), so: an fp64 estimate rounded to fp32, then one
    correction against the exact squares of the two neighbouring midpoints (a 25-bit
    midpoint squares exactly in fp64; no fp32 square root lies on a midpoint).
    """
    r = x.double().sqrt().float()
    up = torch.nextafter(r, torch.full_like(r, math.inf))
    down = torch.nextafter(r, torch.zeros_like(r))
    xd = x.double()
    hi = (r.double() + up.double()) / 2  # exact: 25 significant bits
    lo = (r.double() + down.double()) / 2
    r = torch.where(xd > hi * hi, up, r)
    return torch.where(xd < lo * lo, down, r)


def fisher_factor(vt: torch.Tensor, q: int, sqrt=sqrt_rn) -> torch.Tensor:
    """v_t^(q/4) with square roots only, correctly rounded by default (algorithm.md §2.1b)."""
    if q == 0:
        return torch.ones_like(vt)
    if q == 1:
        return sqrt(sqrt(vt))
    if q == 2:
        return sqrt(vt)
    return vt


def saliency(b, plan: StepPlan, sqrt=sqrt_rn) -> torch.Tensor:
    """The score of every prunable entry, from pre-update w (algorithm.md §2.1, §2.1b):

    - Taylor (eq. 4.4): ``S = |w * g|`` in fp32 with the raw g;
    - Fisher: ``S = |w| * v_t^p`` with ``v_t = beta2 v + (1 - beta2) ghat^2``, ghat the
      clipped gradient of the active network (the v_t the update then stores);

    then, with a saliency EMA, ``keep * EMA + new * S``. Pruned entries have w = 0 (and
    v = 0, a zero EMA), so their S is 0. Every product and sum is rounded separately, in
    the order the fused backends use, so their masks are bit-identical to these. (``sqrt``:
    the N:M pass, which every backend shares, passes ``torch.sqrt``, 100x faster on the CPU.)
    """
    P = b.n_prunable
    w = b.w[:P].float()
    if plan.fisher:
        # the same roundings as (g·M·c), β2·v + ((1-β2)·ĝ)·ĝ, |w|·f(v_t), in place where a
        # temporary is our own (half the memory traffic: the N:M pass runs this every step)
        ghat = torch.where(b.mask, b.g[:P].float(), 0.0).mul_(plan.clip)
        sq = (ghat * plan.fisher_omb2).mul_(ghat)
        vt = (b.v[:P].float() * plan.fisher_beta2).add_(sq)
        s = fisher_factor(vt, plan.fisher_q, sqrt).mul_(w.abs())
    else:
        s = (w * b.g[:P].float()).abs()
    if b.ema is not None:
        s = b.ema * plan.ema_keep + s * plan.ema_new
    return s


def regrown(b, plan: StepPlan) -> torch.Tensor:
    """Pruned entries whose raw |g| exceeds the regrowth threshold (docs/algorithm.md §2.2)."""
    return ~b.mask & (b.g[: b.n_prunable].float().abs() > plan.regrow_theta)


def select(flat, plan: StepPlan) -> Selection:
    """Exact regrowth threshold, then the exact global saliency threshold (docs/algorithm.md §2.2, 2.3)."""
    regrow_theta = math.inf
    if plan.regrow_fraction > 0:
        pruned_absg = torch.cat([b.g[: b.n_prunable].float().abs()[~b.mask] for b in flat.buckets])
        n_pruned = int(flat.comm.sum_counts(torch.tensor([pruned_absg.numel()], device=flat.device))[0])
        n_g, n_keep = regrow_counts(n_pruned, plan.regrow_fraction)
        if n_g > 0:
            # the n_keep smallest |g| stay pruned (ties at the threshold stay pruned)
            regrow_theta = -1.0 if n_keep == 0 else kth_smallest(pruned_absg, n_keep, flat.comm)
    plan.regrow_theta = regrow_theta
    scores, n_regrown = [], 0
    for b in flat.buckets:
        r = regrown(b, plan)
        n_regrown += int(r.sum())
        scores.append(torch.where(r, math.inf, saliency(b, plan)))
    n_regrown = int(flat.comm.sum_counts(torch.tensor([n_regrown], device=flat.device))[0])
    theta = kth_smallest(torch.cat(scores), plan.k, flat.comm) if plan.k > 0 else -1.0
    return Selection(theta=theta, regrow_theta=regrow_theta, n_regrown=n_regrown)


def update(flat, plan: StepPlan) -> None:
    """Pass C: clip, AdamW, TA, new mask, ``w, m, v * M'`` (docs/algorithm.md §1.3-1.6, eq. 4.9-4.15)."""
    t = plan.step
    for b in flat.buckets:
        P = b.n_prunable
        new_mask = None
        if P and (plan.prune or b.ema is not None):
            s = saliency(b, plan)  # before w changes
            if plan.prune:
                new_mask = torch.where(regrown(b, plan), math.inf, s) > plan.theta
            else:
                new_mask = b.mask.clone()
        for gi, start, end in b.ranges:
            h = plan.groups[gi]
            w, m, v = b.w[start:end], b.m[start:end], b.v[start:end]
            grad = b.g[start:end].float()
            if end <= P:  # a prunable group: the gradient of the active network
                grad = grad * b.mask[start:end]
            grad = grad * plan.clip
            wf, mf, vf = w.float(), m.float(), v.float()
            # torch.optim.AdamW, single-tensor, line by line
            wf.mul_(1 - h.lr * h.weight_decay)
            mf.lerp_(grad, 1 - h.beta1)
            vf.mul_(h.beta2).addcmul_(grad, grad, value=1 - h.beta2)
            step_size = h.lr / (1 - h.beta1**t)
            denom = (vf.sqrt() / math.sqrt(1 - h.beta2**t)).add_(h.eps)
            wf.addcdiv_(mf, denom, value=-step_size)
            # terminal attractor: w -= lr * s * g_hat (docs/algorithm.md §1.5)
            if plan.ta_scale != 0:
                wf.add_(grad, alpha=-h.lr * plan.ta_scale)
            if wf.data_ptr() != w.data_ptr():  # low-precision params: write back
                w.copy_(wf), m.copy_(mf), v.copy_(vf)
        if new_mask is not None:
            flat.apply_mask(b, new_mask, ema=s if b.ema is not None else None)
