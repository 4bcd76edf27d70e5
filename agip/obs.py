"""Optimal-brain-surgeon pruning with the layer inputs' second moment (docs/algorithm.md §2.6).

When entries of a linear layer's weight W (rows = outputs, columns = inputs) are set to 0,
the kept entries of the same rows can move so that the layer's output on its inputs X
changes as little as possible: minimise ``||(W' - W) X||²`` subject to the pruned entries
being 0. With H = X Xᵀ (the inputs' second moment, damped) this is OBS (Hassibi & Stork
1993); SparseGPT (Frantar & Alistarh 2023) solves it for many pruned entries per row in one
sweep over the columns with the upper Cholesky factor U of H⁻¹:

    for each column i:  e = (w_i - q_i) / U_ii     (q_i = 0 where pruned, w_i elsewhere)
                        w_(i..) -= e · U_(i, i..)

(in blocks of ``block`` columns, the rest of the row updated once per block). The sweep
never moves an entry of a column before the one it eliminates, so it is exact when every
pruned entry of a row precedes every kept one and the best one-pass approximation otherwise.

This module has the pieces: :class:`InputMoments` (forward hooks that add up xᵀx per
distinct layer input), :func:`sweep` (the column sweep above, with a given mask or with
SparseGPT's own choice of entries) and :func:`sparsegpt` (SparseGPT one-shot, layer block
after layer block, AGIP's own implementation: ``--init sparsegpt``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

DAMP = 0.01  # SparseGPT's damping: H + 0.01 · mean(diag H) · I
BLOCK = 128  # columns per block of the sweep (SparseGPT's)


def _prunable(opt):
    for group in opt.param_groups:
        if group["prune"]:
            yield from zip(group["param_names"], group["params"])


def prunable_modules(model, opt) -> Dict[nn.Module, Tuple[str, bool]]:
    """Every module whose ``.weight`` is a prunable parameter of ``opt``: module -> (the
    parameter's name, whether the weight is stored (in, out) as GPT-2's Conv1D is)."""
    names = {p: n for n, p in _prunable(opt)}
    found = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w in names and w.dim() == 2:
            found[module] = (names.pop(w), type(module).__name__ == "Conv1D")
    if names:
        raise ValueError(f"OBS pruning needs every prunable weight to be the 2-D .weight of a module called by the "
                         f"forward; these are not: {sorted(names.values())[:3]} (leave them out of the prunable set: "
                         "agip.param_groups(..., exclude=...))")
    return found


class InputMoments:
    """H = Σ xᵀx (fp32) over every token a module's input sees, one per distinct input:
    modules that are handed the very same tensor in a forward (q, k and v of an attention
    block; gate and up of a gated MLP) share one H, found on the first forward. ``tokens``
    counts the rows added. Call :meth:`remove` to take the hooks off."""

    def __init__(self, modules, reduce=None):
        self.modules = list(modules)
        if not self.modules:
            raise ValueError("InputMoments needs at least one module")
        self.reduce = reduce  # a function summing a tensor over ranks in place (DDP), or None
        self.h: Dict[nn.Module, torch.Tensor] = {}  # the leader of each shared input -> its H
        self.leader: Dict[nn.Module, nn.Module] = {}
        self.tokens: Dict[nn.Module, int] = {}
        self._seen: list = []  # the first forward: (input tensor, the first module it reached)
        self._hooks = [m.register_forward_hook(self._hook) for m in self.modules]

    def _hook(self, module, args, out):
        x = args[0]
        lead = self.leader.get(module)
        if lead is None:  # the first forward: group by the input tensor itself, held here so that
            # its memory cannot be reused by another input of the same shape meanwhile
            lead = next((m for t, m in self._seen if t is x), module)
            self.leader[module] = lead
            self._seen.append((x, module))
            if len(self.leader) == len(self.modules):
                self._seen = []
        if lead is not module:
            return
        x = x.detach().reshape(-1, x.shape[-1]).float()
        h = self.h.get(module)
        if h is None:
            h = self.h[module] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        h.addmm_(x.t(), x)
        self.tokens[module] = self.tokens.get(module, 0) + x.shape[0]

    def of(self, module) -> torch.Tensor:
        """The H of ``module``'s input (summed over ranks if ``reduce`` was given)."""
        lead = self.leader.get(module)
        if lead is None or lead not in self.h:
            raise RuntimeError("no input reached this module yet: run a forward pass first (its module is not called "
                               "by the model's forward, or the hooks were removed)")
        return self.h[lead]

    def synced(self) -> None:
        """Sum every H over ranks (one all-reduce each): every rank then solves the same sweep."""
        if self.reduce is not None:
            for h in self.h.values():
                self.reduce(h)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.h.values())


def _cholesky_inverse_upper(h: torch.Tensor, damp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """U, the upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹ (fp32), and the
    columns no input ever reached (diag H = 0: their weights do nothing, SparseGPT prunes
    them first). Raises if H is not positive definite even after damping."""
    h = h.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean = float(torch.diagonal(h).mean())
    h.diagonal().add_(damp * mean)
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses it
        raise RuntimeError(f"OBS: the inputs' second moment is not positive definite even with {damp:g}·mean(diag) "
                           "damping; raise the damping or collect more tokens") from e
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True), dead


@torch.no_grad()
def sweep(w: torch.Tensor, h: torch.Tensor, prune: Optional[torch.Tensor] = None, *, ratio: float = 0.0,
          nm: Optional[Tuple[int, int]] = None, damp: float = DAMP, block: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """The OBS column sweep on ``w`` (rows = outputs, columns = inputs; docs/algorithm.md §2.6).

    ``prune`` (bool, w's shape, True = set to 0) fixes which entries go; without it the
    sweep chooses as SparseGPT does, by ``w² / U_ii²`` as it reaches them: ``nm=(N, M)``
    prunes N of every M columns per row, else ``ratio`` of each block of columns (over all
    rows). Returns (the new weight, fp32, zero where pruned; the pruned mask). ``h`` is the
    input's second moment (columns × columns)."""
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"sweep: w must be (outputs, inputs) and h (inputs, inputs); got {tuple(w.shape)} and "
                         f"{tuple(h.shape)}")
    if prune is not None and (prune.shape != w.shape or prune.dtype != torch.bool):
        raise ValueError(f"sweep: prune must be a bool tensor of w's shape {tuple(w.shape)}")
    if prune is None and nm is None and not 0 <= ratio < 1:
        raise ValueError(f"sweep: ratio must be in [0, 1), got {ratio}")
    if nm is not None and (w.shape[1] % nm[1] or block % nm[1]):
        raise ValueError(f"sweep: N:M needs inputs ({w.shape[1]}) and the block ({block}) divisible by M={nm[1]}")
    u, dead = _cholesky_inverse_upper(h.to(w.device), damp)
    w = w.detach().float().clone()
    w[:, dead] = 0
    cut = torch.zeros(w.shape, dtype=torch.bool, device=w.device) if prune is None else prune.clone()
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        d = torch.diagonal(u1)
        if prune is None and nm is None and ratio > 0:
            score = w1 ** 2 / d[None, :] ** 2
            k = int(score.numel() * ratio)
            if k:
                theta = torch.kthvalue(score.reshape(-1).cpu(), k).values.to(score.device)
                cut[:, i1:i2] = score <= theta
        for i in range(i2 - i1):
            if nm is not None and prune is None and i % nm[1] == 0:
                score = w1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                idx = torch.topk(score, nm[0], dim=1, largest=False).indices
                cut[:, i1 + i:i1 + i + nm[1]].scatter_(1, idx, True)
            col = w1[:, i]
            e = torch.where(cut[:, i1 + i], col, torch.zeros_like(col)) / d[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w1.masked_fill_(cut[:, i1:i2], 0.0)
        w[:, i1:i2] = w1
        if i2 < cols:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, cut


def output_error(w0: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W0) H (W - W0)ᵀ): the squared change of the layer's outputs over the inputs H sums."""
    d = (w.float() - w0.float())
    return float(((d @ h.float()) * d).sum())


def _blocks(model, modules) -> Optional[nn.ModuleList]:
    """The model's list of transformer blocks: the nn.ModuleList whose entries hold the most
    prunable modules (None if no list holds any)."""
    best, most = None, 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            n = sum(1 for child in m for sub in child.modules() if sub in modules)
            if n > most:
                best, most = m, n
    return best


class _Stop(Exception):
    pass


def _forward(model, x):
    """The model on token ids, without a KV cache where it has one (a cache captured with a
    block's inputs would grow each time the block runs)."""
    import inspect

    if "use_cache" in inspect.signature(model.forward).parameters:
        return model(x, use_cache=False)
    return model(x)


def _solve(modules, moments, chosen, ratio, nm, damp, block) -> Dict[str, torch.Tensor]:
    masks = {}
    for module in chosen:
        name, transposed = modules[module]
        weight = module.weight
        w = weight.detach().t() if transposed else weight.detach()
        new, cut = sweep(w, moments.of(module), ratio=ratio, nm=nm, damp=damp, block=block)
        weight.copy_((new.t() if transposed else new).to(weight.dtype))
        masks[name] = ~(cut.t() if transposed else cut)
    return masks


@torch.no_grad()
def sparsegpt(model, opt, ratio: float, calibration, pattern: str = "unstructured", damp: float = DAMP,
              block: int = BLOCK) -> Dict[str, torch.Tensor]:
    """SparseGPT one-shot (Frantar & Alistarh 2023), AGIP's implementation (docs/algorithm.md
    §2.6): block after transformer block, the inputs of a block are those the blocks before
    it give *after* they were pruned; in each block every prunable layer is pruned to
    ``ratio`` (or N:M) by :func:`sweep` from H of its inputs over the ``calibration`` batches
    (a list of token tensors). The weights are changed in place; returns the masks (name ->
    bool, True = kept). Prunable layers outside the blocks are pruned last, from one forward
    of the whole model."""
    from .nm import nm_of

    n_m = nm_of(pattern, ratio)
    if not calibration:
        raise ValueError("sparsegpt needs at least one calibration batch (a list of token tensors)")
    modules = prunable_modules(model, opt)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    masks = {}
    try:
        blocks = _blocks(model, modules)
        done = set()
        if blocks is not None:
            inputs = []  # (args, kwargs) of the first block, one per calibration batch

            def grab(mod, args, kwargs):
                inputs.append((args, kwargs))
                raise _Stop

            hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for x in calibration:
                    try:
                        _forward(model, x.to(device))
                    except _Stop:
                        pass
            finally:
                hook.remove()
            for layer in blocks:
                chosen = [m for m in layer.modules() if m in modules]
                if chosen:
                    moments = InputMoments(chosen)
                    try:
                        for args, kwargs in inputs:
                            layer(*args, **kwargs)
                    finally:
                        moments.remove()
                    masks.update(_solve(modules, moments, chosen, ratio, n_m, damp, block))
                    done.update(chosen)
                outs = [layer(*args, **kwargs) for args, kwargs in inputs]  # the pruned block's outputs
                inputs = [((o[0] if isinstance(o, tuple) else o, *args[1:]), kwargs)
                          for o, (args, kwargs) in zip(outs, inputs)]
        rest = [m for m in modules if m not in done]
        if rest:
            moments = InputMoments(rest)
            try:
                for x in calibration:
                    _forward(model, x.to(device))
            finally:
                moments.remove()
            masks.update(_solve(modules, moments, rest, ratio, n_m, damp, block))
    finally:
        model.train(was_training)
    return masks


def h_bytes(model, opt) -> int:
    """The memory an H per distinct layer input takes for this model (fp32), as
    :class:`InputMoments` keeps it: measured by one forward of one short input."""
    modules = prunable_modules(model, opt)
    moments = InputMoments(modules)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        moments.remove()
    return moments.nbytes()



class Compensation:
    """``compensate="obs"`` (docs/algorithm.md §2.6): before a pruning step's cut is applied,
    every row of a prunable weight that loses entries takes the OBS update of :func:`sweep`
    with its whole mask (entries pruned before stay 0: they are constraints too), H being
    the sum of xᵀx over every training batch its input has seen so far (summed over ranks
    under DDP). m and v of the moved weights are left as they are. The hooks come off when
    the target is reached (:meth:`release`): H is not kept in checkpoints, so a run resumed
    during the ramp collects it anew."""

    def __init__(self, model, opt, comm):
        modules = prunable_modules(model, opt)
        self.by_param = {id(m.weight): m for m in modules}
        self.moments = InputMoments(modules)
        self.comm = comm
        self.seconds = 0.0  # time spent in sweeps (bench_step reports it)
        self.released = False

    @torch.no_grad()
    def __call__(self, b, new_mask: torch.Tensor) -> None:
        import time

        if self.released:
            raise RuntimeError("compensate='obs': the inputs' hooks were released when the target was reached; no "
                               "cut can be compensated after that")
        t0 = time.perf_counter()
        for s in b.slots:
            if s.start >= b.n_prunable:
                continue
            sl = slice(s.start, s.start + s.numel)
            cut = b.mask[sl] & ~new_mask[sl]
            if not bool(cut.any()):
                continue
            module = self.by_param[id(s.param)]
            h = self.moments.of(module).clone()
            self.comm.sum_replicated(h)
            w, keep, cut = (t.view(s.shape) for t in (b.w[sl], new_mask[sl], cut))
            if s.input_dim == 0:  # GPT-2's Conv1D stores (in, out): rows are the outputs
                w, keep, cut = w.t(), keep.t(), cut.t()
            rows = cut.any(dim=1)
            new, _ = sweep(w[rows], h, prune=~keep[rows])
            w[rows] = new.to(w.dtype)
        self.seconds += time.perf_counter() - t0

    def release(self) -> None:
        self.moments.remove()
        self.moments.h.clear()
        self.released = True
