"""The pruning baselines the quality study compares AGIP with (issue 6), as masks that
:meth:`agip.AGIP.apply_masks` installs; training then runs on the shared harness.

- one-shot magnitude: the global threshold on |W| over the prunable weights;
- GMP (Zhu & Gupta): the same magnitude criterion, re-applied during training with the
  cubic schedule (``gmp_ratio``);
- Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 with the input-feature norms from
  calibration activations, pruned per output row (Wanda's comparison group);
- PLATON (Zhang et al. 2022): the smoothed Taylor score I_bar * U_bar (``PlatonScore``),
  re-thresholded globally on the cubic schedule.
"""
from __future__ import annotations

import math

import torch

from . import nm
from .threshold import radix_select, torch_histogram


def _prunable(opt):
    for group in opt.param_groups:
        if group["prune"]:
            yield from zip(group["param_names"], group["params"])


@torch.no_grad()
def magnitude_masks(opt, ratio: float, pattern: str = "unstructured") -> dict:
    """Global magnitude pruning: prune the floor(ratio * N) smallest |W| over all
    prunable weights (ties at the threshold pruned, as in docs/algorithm.md §2.3). Already-pruned
    weights are zero, so they stay pruned. With an N:M ``pattern`` (``ratio`` must be N/M):
    the N smallest |W| of every M along the layer's input."""
    named = list(_prunable(opt))
    if not named:
        raise ValueError("no prunable parameters (param groups with prune=True)")
    if nm.nm_of(pattern, ratio) is not None:
        dims = {s.name: s.input_dim for _, s in opt._flat.prunable_slots()}
        return {name: nm_keep(p.detach().float().abs(), dims[name], *nm.nm_of(pattern, ratio)) for name, p in named}
    return _global_masks([(name, p.detach().float().abs()) for name, p in named], ratio)


def nm_keep(score: torch.Tensor, input_dim: int, n: int, m: int) -> torch.Tensor:
    """The N:M mask of one weight (True = keep): in every M consecutive entries along
    ``input_dim``, the N of smallest ``score`` are pruned (ties: the lower index first)."""
    if score.shape[input_dim] % m:
        raise ValueError(f"an N:{m} mask needs an input size divisible by {m}, got shape {tuple(score.shape)}")
    groups = score.movedim(input_dim, -1).reshape(-1, m)
    order = torch.sort(groups, dim=1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], False)
    moved = list(score.shape)
    moved.append(moved.pop(input_dim))
    return keep.reshape(moved).movedim(-1, input_dim).contiguous()


def _global_masks(named_scores, ratio: float) -> dict:
    """Prune the floor(ratio * N) smallest scores over all the given tensors (exact global
    threshold, ties pruned: docs/algorithm.md §2.3)."""
    flat = torch.cat([s.reshape(-1) for _, s in named_scores]).cpu()
    k = int(math.floor(ratio * flat.numel()))
    if k == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in named_scores}
    theta = radix_select(k, torch_histogram(flat))
    return {name: s > theta for name, s in named_scores}


class PlatonScore:
    """PLATON's weight importance (Zhang et al. 2022, eq. 6-8), kept on the host: after each
    step, with I = |w * g| of every prunable weight,

        I_bar <- b1 * I_bar + (1 - b1) * I
        U_bar <- b2 * U_bar + (1 - b2) * |I - I_bar|     (with the updated I_bar)

    and the score S = I_bar * U_bar (two fp32 buffers: 8 bytes per prunable weight). As in
    PLATON's code, w is the weight after the step and g the step's gradient (the harness'
    ``after_step`` hook runs after ``opt.step`` and before ``zero_grad``).
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95):
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"PLATON's betas must lie in [0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.i_bar, self.u_bar = {}, {}

    @torch.no_grad()
    def update(self, opt) -> None:
        for name, p in _prunable(opt):
            if p.grad is None:
                continue
            ipt = (p.detach().float() * p.grad.float()).abs_()
            if name not in self.i_bar:
                self.i_bar[name], self.u_bar[name] = torch.zeros_like(ipt), torch.zeros_like(ipt)
            i_bar = self.i_bar[name].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
            self.u_bar[name].mul_(self.beta2).add_(ipt.sub_(i_bar).abs_(), alpha=1 - self.beta2)

    @torch.no_grad()
    def masks(self, ratio: float) -> dict:
        """Global masks at ``ratio`` by S = I_bar * U_bar; a weight pruned before may come back
        (with w = 0) when its smoothed score rises above the threshold, as in PLATON."""
        if not self.i_bar:
            raise ValueError("PlatonScore.masks: call update() after a step first")
        return _global_masks([(n, self.i_bar[n] * self.u_bar[n]) for n in self.i_bar], ratio)


def gmp_ratio(step: int, total_steps: int, target: float, start: float = 0.05, end: float = 0.75) -> float:
    """Zhu & Gupta's cubic schedule (docs/algorithm.md §3, shape 'cubic'), ramping from start*T to end*T."""
    t0, t1 = start * total_steps, end * total_steps
    if step < t0:
        return 0.0
    frac = 1.0 if t1 <= t0 else min(1.0, (step - t0) / (t1 - t0))
    return target * (1 - (1 - frac) ** 3)


@torch.no_grad()
def input_norms(model, opt, calibration) -> dict:
    """||X_j||_2 for every prunable weight: the norm of each of its inputs over the
    ``calibration`` batches (a list of token tensors), as Wanda scores with (a vector over
    the weight's input dimension; dim 1 of an nn.Linear, dim 0 of GPT-2's Conv1D). For
    Wanda here and for ``AGIP.set_input_norms`` (docs/algorithm.md §2.5c). Keyed by the
    prunable parameter; raises if a prunable weight saw no input (not under a module with a
    ``weight``, or not reached by the forward)."""
    if not calibration:
        raise ValueError("input_norms needs at least one calibration batch (a list of token tensors)")
    names = {p: n for n, p in _prunable(opt)}
    sq, hooks = {}, []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if w is None or w not in names:
            continue

        def hook(mod, args, out, key=w):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq[key] = sq.get(key, 0) + (x * x).sum(0)

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in calibration:
            model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for p, name in names.items():
        if p not in sq:
            raise RuntimeError(f"no calibration input reached {name}: its module is not called by the forward, or "
                               "it is not a module's .weight")
    return {p: sq[p].sqrt() for p in names}


@torch.no_grad()
def wanda_masks(model, opt, ratio: float, calibration, pattern: str = "unstructured") -> dict:
    """Wanda: per output row, prune the floor(ratio * fan_in) weights with the smallest
    |W_ij| * ||X_j||_2, X being the layer's inputs over the ``calibration`` batches (a
    list of token tensors). Works for nn.Linear (out, in) and GPT-2's Conv1D (in, out).
    With an N:M ``pattern`` (Wanda's own N:M variant; ``ratio`` must be N/M): the N of
    smallest score in every M consecutive inputs of a row."""
    n_m = nm.nm_of(pattern, ratio)
    names = {p: n for n, p in _prunable(opt)}
    norms = input_norms(model, opt, calibration)
    transposed = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if w is not None and w in names:
            transposed[w] = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
    masks = {}
    for p, name in names.items():
        norm = norms[p]
        w = p.detach().float().abs()
        score = (w * norm[:, None]).t() if transposed[p] else w * norm[None, :]  # rows = outputs
        if n_m is not None:
            keep = nm_keep(score, 1, *n_m)
            masks[name] = keep.t().contiguous() if transposed[p] else keep
            continue
        k = int(math.floor(ratio * score.shape[1]))
        keep = torch.ones_like(score, dtype=torch.bool)
        if k > 0:
            idx = torch.topk(score, k, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
        masks[name] = keep.t().contiguous() if transposed[p] else keep
    return masks


INITS = ("sparsegpt", "wanda")  # the one-shot starts of AGIP (--init)


@torch.no_grad()
def one_shot_start(model, opt, solver: str, calibration) -> dict:
    """AGIP's start from a one-shot solver (``--init``; docs/algorithm.md §2.6): the solver
    prunes to the optimizer's ``target_sparsity`` in its ``sparsity_pattern`` (``ratio``
    must be N/M for N:M) from the ``calibration`` batches: ``"sparsegpt"`` (AGIP's own
    SparseGPT, :func:`agip.obs.sparsegpt`, which also moves the kept weights) or
    ``"wanda"`` (:func:`wanda_masks`; the kept weights stay). With fixed masks (unstructured,
    or ``nm_mode="fixed"``) the masks are installed (:meth:`AGIP.apply_masks`), so AGIP then
    trains them as SparseGPT/Wanda + FT do; with ``nm_mode="decay"`` only the pruned
    weights are set to 0 and the masks stay open: AGIP's decay mode may still change them.
    Returns the masks (name -> bool, True = kept)."""
    from . import obs

    if solver not in INITS:
        raise ValueError(f"--init must be one of {INITS}, got {solver!r}")
    config = opt.config
    ratio, pattern = config.target_sparsity, config.sparsity_pattern
    if ratio <= 0:
        raise ValueError("a one-shot start needs target_sparsity > 0")
    if solver == "sparsegpt":
        masks = obs.sparsegpt(model, opt, ratio, calibration, pattern)
    else:
        masks = wanda_masks(model, opt, ratio, calibration, pattern)
    if config.nm_mode == "decay":
        named = dict(_prunable(opt))
        for name, keep in masks.items():
            named[name].masked_fill_(~keep, 0)
    else:
        opt.apply_masks(masks)
    return masks


def sparsegpt_masks(model, opt, ratio: float, calibration, pattern: str = "unstructured") -> dict:
    """SparseGPT through the library users reach for: llmcompressor's ``SparseGPTModifier``
    with ``oneshot`` (the ``baselines`` extra). Each prunable layer is pruned to ``ratio``
    (unstructured) by SparseGPT's approximate OBS solver, which also updates the weights it
    keeps, from the inputs of the ``calibration`` blocks (a list of token tensors); everything else (embeddings, the
    tied ``lm_head``) is left out by naming only the prunable layers as targets. Returns
    the masks (True = non-zero) of the weights as SparseGPT left them. With an N:M ``pattern``
    (``ratio`` must be N/M) it is llmcompressor's ``mask_structure="N:M"``."""
    structure = "0:0" if nm.nm_of(pattern, ratio) is None else pattern
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier
    except ImportError as e:
        raise ImportError(f"--method sparsegpt needs llmcompressor ({e}): python -m pip install -e '.[baselines]' "
                          "(it pins its own transformers version: a separate virtual environment is wise)") from e
    prunable = list(_prunable(opt))
    blocks = torch.cat([x.cpu() for x in calibration])
    # ready token blocks (llmcompressor still loads the model folder's tokenizer, unused)
    data = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    targets = [n[: -len(".weight")] for n, _ in prunable]
    oneshot(model=model, dataset=data, recipe=SparseGPTModifier(sparsity=ratio, mask_structure=structure, targets=targets),
            num_calibration_samples=len(blocks), max_seq_length=blocks.shape[1], shuffle_calibration_samples=False,
            pipeline="sequential")
    masks = {n: p.detach() != 0 for n, p in prunable}
    for n, m in masks.items():
        if float((~m).float().mean()) < ratio / 2:
            raise RuntimeError(f"llmcompressor's SparseGPT left {n} unpruned (it prunes nn.Linear layers; GPT-2's "
                               "Conv1D is not one): use --method wanda for this model")
    return masks
