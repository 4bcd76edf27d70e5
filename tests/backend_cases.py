"""Random flat states and step plans for comparing a backend with the reference."""
import copy
import math

import torch

from agip.backends import GroupHyper, StepPlan
from agip.flat import FlatState

# (prune, sizes of the parameters) per param group; odd sizes, zero-size layers
LAYOUTS = {
    "odd": [(True, [67, 0, 301, 5]), (False, [129, 3]), (False, [1])],
    "many": [(True, [200, 199]), (True, [1, 450]), (False, [77, 0, 260])],
    "prunable_only": [(True, [513])],
    "dense_only": [(False, [300, 17])],
}


def make_flat(layout, seed=0, pruned=0.3, ema=False, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    groups = []
    for prune, sizes in LAYOUTS[layout]:
        params = [torch.nn.Parameter((torch.randn(n, generator=g) * 0.5).to(device, dtype)) for n in sizes]
        groups.append({"params": params, "prune": prune})
    flat = FlatState(groups, saliency_ema=ema)
    for b in flat.buckets:
        n, P = b.numel, b.n_prunable
        b.g.copy_(torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 2, (n,), generator=g))
        b.m.copy_(torch.randn(n, generator=g) * 0.01)
        b.v.copy_(torch.rand(n, generator=g) * 1e-4)
        # a few exact ties and zeros in the saliency
        b.w[: min(P, 10)] = 0.25
        b.g[: min(P, 10)] = 2.0
        b.g[P : P + 3] = 0.0
        # the invariant of SPEC 0: pruned entries hold w = m = v = 0 (and a zero EMA)
        mask = torch.rand(P, generator=g) >= pruned
        b.mask.copy_(mask)
        b.w[:P][~mask] = 0
        b.m[:P][~mask] = 0
        b.v[:P][~mask] = 0
        if b.ema is not None:
            b.ema.copy_((torch.rand(P, generator=g) * 0.1) * mask)
    return flat, groups


def make_plan(flat, k_frac, regrow=0.0, ema_rho=0.0, step=3, ta_scale=0.7, clip=0.5, prune=True):
    keep, new = StepPlan.ema_constants(ema_rho)
    n_groups = max(gi for b in flat.buckets for gi, _, _ in b.ranges) + 1
    hyper = [GroupHyper(lr=1e-2 * (i + 1), weight_decay=0.01 * i, beta1=0.9, beta2=0.999, eps=1e-8)
             for i in range(n_groups)]
    return StepPlan(step=step, clip=clip, ta_scale=ta_scale, groups=hyper, prune=prune,
                    k=int(math.floor(k_frac * flat.n_prunable)), regrow_fraction=regrow,
                    ema_keep=keep, ema_new=new)


def run_backend(backend, flat, plan):
    plan = copy.deepcopy(plan)
    g2 = backend.grad_sumsq(flat, plan)
    sel = None
    if plan.prune:
        sel = backend.select(flat, plan)
        plan.theta, plan.regrow_theta = sel.theta, sel.regrow_theta
    backend.update(flat, plan)
    return g2, sel


def ulps(a, b, before=None):
    """Largest distance between a and b in fp32 ulps of the operands' magnitude.

    The magnitude is max(|a|, |b|, |before|): where an update cancels (0.9 m + 0.1 g ~ 0,
    or w - step ~ 0) the rounding error is relative to the operands, not to the result.
    """
    a, b = a.double().cpu(), b.double().cpu()
    scale = torch.maximum(a.abs(), b.abs())
    if before is not None:
        scale = torch.maximum(scale, before.double().cpu().abs())
    spacing = scale.clamp_min(1e-30) * 2.0**-23
    return float(((a - b).abs() / spacing).max()) if a.numel() else 0.0
