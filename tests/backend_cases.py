"""Random flat states and step plans for comparing a backend with the reference."""
import copy
import math

import pytest
import torch

from agip.backends import GroupHyper, StepPlan
from agip.flat import FlatState

# (prune, sizes of the parameters) per param group; odd sizes, zero-size layers
LAYOUTS = {
    "odd": [(True, [67, 0, 301, 5]), (False, [129, 3]), (False, [1])],
    "many": [(True, [200, 199]), (True, [1, 450]), (False, [77, 0, 260])],
    "prunable_only": [(True, [513])],
    "dense_only": [(False, [300, 17])],
    # several 65,536-entry chunks of the C++ loops, ragged ends
    "large": [(True, [70000, 100001]), (False, [65537, 3])],
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
        # the invariant of docs/algorithm.md §0: pruned entries hold w = m = v = 0 (and a zero EMA)
        mask = torch.rand(P, generator=g) >= pruned
        b.mask.copy_(mask)
        b.w[:P][~mask] = 0
        b.m[:P][~mask] = 0
        b.v[:P][~mask] = 0
        if b.ema is not None:
            b.ema.copy_((torch.rand(P, generator=g) * 0.1) * mask)
    return flat, groups


# the scores every backend must rank alike: Taylor (-1) and Fisher |w| v_t^(q/4), q = 4p
SCORES = [-1, 2, 1]
ALL_SCORES = [-1, 0, 1, 2, 4]


def make_plan(flat, k_frac, regrow=0.0, ema_rho=0.0, step=3, ta_scale=0.7, clip=0.5, prune=True, fisher_q=-1,
              beta2=0.999, beta1=0.9, eps=1e-8, moment="current"):
    keep, new = StepPlan.ema_constants(ema_rho)
    n_groups = max(gi for b in flat.buckets for gi, _, _ in b.ranges) + 1
    hyper = [GroupHyper(lr=1e-2 * (i + 1), weight_decay=0.01 * i, beta1=beta1, beta2=beta2, eps=eps)
             for i in range(n_groups)]
    b2, omb2 = StepPlan.fisher_constants(beta2) if moment == "current" else (1.0, 0.0)  # v_(t-1): agip/step.py
    return StepPlan(step=step, clip=clip, ta_scale=ta_scale, groups=hyper, prune=prune,
                    k=int(math.floor(k_frac * flat.n_prunable)), regrow_fraction=regrow,
                    ema_keep=keep, ema_new=new, fisher_q=fisher_q, fisher_beta2=b2, fisher_omb2=omb2)


def run_backend(backend, flat, plan):
    plan = copy.deepcopy(plan)
    g2 = backend.grad_sumsq(flat, plan)
    sel = None
    if plan.prune:
        sel = backend.select(flat, plan)
        plan.theta, plan.regrow_theta = sel.theta, sel.regrow_theta
    backend.update(flat, plan)
    return g2, sel


def ulps(a, b, before=None, mantissa_bits=23):
    """Largest distance between a and b in fp32 ulps of the operands' magnitude.

    The magnitude is max(|a|, |b|, |before|): where an update cancels (0.9 m + 0.1 g ~ 0,
    or w - step ~ 0) the rounding error is relative to the operands, not to the result.
    """
    a, b = a.double().cpu(), b.double().cpu()
    scale = torch.maximum(a.abs(), b.abs())
    if before is not None:
        scale = torch.maximum(scale, before.double().cpu().abs())
    spacing = scale.clamp_min(1e-30) * 2.0**-mantissa_bits
    return float(((a - b).abs() / spacing).max()) if a.numel() else 0.0


# w, m, v tolerance, in fp32 ulps of the operands (see ulps): the fused backends
# evaluate the same fp32 formulas as the reference, but torch's CPU kernels use fused
# multiply-adds (lerp, addcmul) where the fused kernels round each product, so m and v
# may differ by 1 ulp; w sums three terms (decay, Adam step, TA step), each carrying up
# to 1 ulp: <= 3 ulps. Seen over 50 random states (triton): w 2.9, m 1.0, v 1.0. On an
# AMD EPYC, where torch's CPU kernels round differently, one optimizer-level step of the
# triton interpreter reached 4.9 on an embedding row (test_backends_optimizer, Fisher 1/4,
# step 6, with HEAD's code before the redesign too): 6.
MAX_ULPS = 6

# layout, pruned fraction before, k fraction, regrowth, ema, pruning step
CASES = [
    ("odd", 0.3, 0.5, 0.0, 0.0, True),
    ("odd", 0.3, 0.5, 0.2, 0.0, True),
    ("many", 0.0, 0.4, 0.0, 0.9, True),  # none pruned yet
    ("many", 0.2, 0.3, 0.5, 0.5, True),
    ("prunable_only", 1.0, 0.5, 0.3, 0.0, True),  # all pruned: regrowth decides
    ("prunable_only", 1.0, 0.0, 1.0, 0.0, True),  # all regrow, nothing to prune
    ("prunable_only", 0.0, 0.0, 0.0, 0.0, True),  # k = 0: keep every entry
    ("many", 0.2, 0.999, 0.0, 0.0, True),  # k = N - 1 or so
    ("odd", 0.3, 0.5, 0.0, 0.5, False),  # non-pruning step with an EMA
    ("dense_only", 0.0, 0.0, 0.0, 0.0, False),
]


# Adam's other constants: both branches of torch's lerp (weight < 0.5 and >= 0.5), a first
# and a late step (bias corrections near 0 and 1), eps from tiny to large, another beta2
HYPERS = [dict(beta1=0.0, step=1, eps=1e-3), dict(beta1=0.5, step=1000, eps=1e-6),
          dict(beta1=0.99, step=2, eps=1e-12, beta2=0.9)]


def compare_with_reference(backend, case, device="cpu", seed=0, dtype=torch.float32, fisher_q=-1, **plan_kw):
    """One step of ``backend`` and of the reference from the same state: masks, theta and
    the regrowth decision bit-identical, G^2 within 1e-6, w/m/v within MAX_ULPS, for the
    score ``fisher_q`` (-1: Taylor)."""
    from agip.backends import reference

    layout, pruned, k_frac, regrow, rho, prune = case
    ref, _ = make_flat(layout, seed=seed, pruned=pruned, ema=rho > 0, dtype=dtype)
    other, _ = make_flat(layout, seed=seed, pruned=pruned, ema=rho > 0, device=device, dtype=dtype)
    plan = make_plan(ref, k_frac, regrow=regrow, ema_rho=rho, prune=prune, fisher_q=fisher_q, **plan_kw)
    before = [{n: getattr(b, n).clone() for n in "wmv"} for b in ref.buckets]
    g2_ref, sel_ref = run_backend(reference, ref, plan)
    g2, sel = run_backend(backend, other, plan)
    assert g2 == pytest.approx(g2_ref, rel=1e-6)
    if prune:
        assert sel == sel_ref  # theta, regrowth threshold and count: bit-identical
    for rb, ob, old in zip(ref.buckets, other.buckets, before):
        assert torch.equal(rb.mask, ob.mask.cpu())
        if rb.ema is not None:
            assert torch.equal(rb.ema, ob.ema.cpu())
        for name in ("w", "m", "v"):
            a, b = getattr(rb, name), getattr(ob, name).cpu()
            bits = {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 23)
            assert ulps(a, b, old[name], bits) <= MAX_ULPS, name
            assert torch.equal(a == 0, b == 0), f"{name}: zeros differ"
    if prune and plan.k > 0:
        assert sum(int((~b.mask).sum()) for b in ref.buckets) >= plan.k


def compare_over_steps(backend, k_fracs, device="cpu", regrow=0.0, rho=0.0, layout="large", fisher_q=-1,
                       fresh_grads=True, scratch=None, moment="current"):
    """Several pruning steps on one flat state, so a fused backend's window around the
    previous theta is used (and missed, when k jumps): theta and masks must match the
    reference at every step. Before each step the backend's buffers are set to the
    reference's, so ulp-level drift in w cannot move the boundary. ``fresh_grads=False``
    keeps the first step's gradients, so the scores drift as in training (theta moves by
    less each step of a ramp); ``scratch`` (a dict) receives the fields of the backend's
    :class:`~agip.backends.fused.DriverState`."""
    from agip.backends import reference

    ref, _ = make_flat(layout, pruned=0.0, ema=rho > 0)
    other, _ = make_flat(layout, pruned=0.0, ema=rho > 0, device=device)
    gen = torch.Generator().manual_seed(7)
    thetas = []
    for step, k_frac in enumerate(k_fracs, start=1):
        for rb, ob in zip(ref.buckets, other.buckets):
            if fresh_grads or step == 1:
                rb.g.copy_(torch.randn(rb.numel, generator=gen) * 1e-2)
            for name in ("w", "g", "m", "v", "mask") + (("ema",) if rho > 0 else ()):
                getattr(ob, name).copy_(getattr(rb, name))
        plan = make_plan(ref, k_frac, regrow=regrow, ema_rho=rho, step=step, fisher_q=fisher_q, moment=moment)
        _, sel_ref = run_backend(reference, ref, plan)
        _, sel = run_backend(backend, other, plan)
        assert sel == sel_ref, (step, sel, sel_ref)
        for rb, ob in zip(ref.buckets, other.buckets):
            assert torch.equal(rb.mask, ob.mask.cpu()), step
        thetas.append(sel.theta)
    state = other.scratch[backend._driver.name]
    if scratch is not None:
        scratch.update(vars(state))
    return thetas, state.window_misses


def sync_optimizers(src_model, src_opt, dst_model, dst_opt):
    """Copy the weights and the optimizer state (m, v, masks, EMA) of one model/optimizer
    into another, so each step of a cross-backend test starts from the reference's state
    (ulp drift cannot add up)."""
    with torch.no_grad():
        for a, b in zip(src_model.parameters(), dst_model.parameters()):
            b.copy_(a)
    for pa, pb in zip(src_model.parameters(), dst_model.parameters()):
        for key, val in src_opt.state[pa].items():
            dst_opt.state[pb][key].copy_(val)


def compare_scores_ahead(backend, k_fracs, device="cpu", regrow=0.0, layout="many", fisher_q=1, valid=None):
    """Pruning steps of the Fisher score of v_(t-1) with scores ahead: each update also
    histograms the next step's scores, which the next step's pass A then skips. Every step
    the reference selects from a copy of the backend's own state (the state its update
    wrote): theta, the regrowth decision and the masks must be bit-identical. ``valid[i]``
    False tells step i that something wrote the buffers (the optimizer's version check):
    it must histogram the scores itself. Returns the backend's DriverState."""
    from agip.backends import reference

    other, _ = make_flat(layout, pruned=0.0, device=device)
    ref, _ = make_flat(layout, pruned=0.0)
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(b.numel, generator=gen) * 1e-2 for b in other.buckets]
    for step, k_frac in enumerate(k_fracs, start=1):
        for ob, rb, g in zip(other.buckets, ref.buckets, grads):
            ob.g.copy_(g * (1 + 0.1 * step))  # gradients that drift, as in training
            for name in ("w", "g", "m", "v", "mask"):
                getattr(rb, name).copy_(getattr(ob, name).cpu())
        plan = make_plan(other, k_frac, regrow=regrow, step=step, fisher_q=fisher_q, moment="previous")
        plan.score_ahead = step < len(k_fracs)
        plan.ahead_valid = True if valid is None else valid[step - 1]
        _, sel_ref = run_backend(reference, ref, plan)
        _, sel = run_backend(backend, other, plan)
        assert sel == sel_ref, (step, sel, sel_ref)
        for rb, ob in zip(ref.buckets, other.buckets):
            assert torch.equal(rb.mask, ob.mask.cpu()), step
    return other.scratch[backend._driver.name]
