"""The optimizers: the classes own param groups and state; the math lives in backends.

:class:`TAAdamW` is the masked AdamW with the terminal-attractor term (docs/algorithm.md
§1); :class:`AGIP` adds what pruning needs: the sparsity schedule (§3) and a selection of
the new mask on pruning steps (§2). ``step(loss=...)`` runs §1 in order: the loss, G^2,
the clip factor and the TA scalar (:mod:`agip.step`), the selection, the backend's update.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from . import backends, selection, state
from . import step as core
from .comm import make_comm
from .config import Config, check_group, need
from .dtensor import is_dtensor, local
from .flat import FlatState
from .schedule import SparsitySchedule


class TAAdamW(torch.optim.Optimizer):
    """AdamW with the terminal-attractor term over flat buffers (docs/algorithm.md §1), the
    masked update AGIP prunes with; with no pruning a drop-in for ``torch.optim.AdamW``
    (plus ``clip_grad_norm_``) whose ``step`` takes ``loss=``: with ``ta_gamma=0`` it is
    plain AdamW with gradient clipping.

    Parameters and their gradients become views into flat buffers (docs/design.md): create
    the optimizer after moving the model to its device and dtype. ``zero_grad`` always
    zeroes in place (gradients stay bound to the buffers), whatever ``set_to_none`` says.
    Under DDP or FSDP2 (algorithm.md §6) build it on the model (FSDP2: after
    ``fully_shard``); ``process_group`` is the data-parallel group (default: the FSDP2
    mesh's, else the world when ``torch.distributed`` is initialised).
    """

    def __init__(self, params, lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0, ta_gamma: float = 1.0,
                 ta_beta: float = 0.5, ta_k: float = 1.0, ta_clip: float = 1.0, ta_eps: float = 1e-8,
                 ta_loss_floor: float = 0.0, backend: str = "auto", process_group=None, *, config: Config = None):
        self.config = config or Config.resolve(
            max_grad_norm=max_grad_norm, ta_gamma=ta_gamma, ta_beta=ta_beta, ta_k=ta_k, ta_clip=ta_clip, ta_eps=ta_eps,
            ta_loss_floor=ta_loss_floor, target_sparsity=0.0, stability=False)
        need(isinstance(backend, str), f"backend must be a string, got {type(backend).__name__}")
        cfg = self.config  # R_t (docs/algorithm.md §3): 0 at every step without a target
        self.schedule = SparsitySchedule(cfg.target_sparsity, cfg.schedule, cfg.total_steps, cfg.warmup_steps,
                                         cfg.tau, cfg.prune_interval, cfg.stability, cfg.stability_window,
                                         cfg.ramp_end)
        self._selection = None  # AGIP's: which entries a pruning step keeps
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, prune=False)
        check_group(defaults)
        super().__init__(params, {**defaults, "betas": tuple(betas)})
        if config is None:  # TAAdamW's own settings prune nothing: its groups hold no masks
            for g in self.param_groups:
                g["prune"] = False
        self._process_group = process_group
        self.comm = make_comm([p for g in self.param_groups for p in g["params"]], process_group)
        self._flat = FlatState(self.param_groups, saliency_ema=self.config.saliency_ema > 0, comm=self.comm)
        self.backend = backends.resolve(backend, self._flat.device)
        for b in self._flat.buckets:  # torch's state layout, as views of the buckets
            for s in b.slots:
                st, sl = self.state[s.param], slice(s.start, s.start + s.numel)
                st["exp_avg"], st["exp_avg_sq"] = b.m[sl].view(s.shape), b.v[sl].view(s.shape)
                if s.start < b.n_prunable:
                    st["mask"] = b.mask[sl].view(s.shape)
                    if b.ema is not None:
                        st["saliency_ema"] = b.ema[sl].view(s.shape)
        # scores ahead (docs/design.md): AGIP's, for the Fisher score of v_(t-1); _stamp: the
        # version counters of w, v and the masks after the last step (flat.stamp)
        self._score_ahead, self._stamp = False, None
        self._fisher_b2 = self._fisher_beta2()
        self._step, self.skipped_steps, self._warned_skip = 0, 0, False
        self._last = dict(theta=None, regrown=0, alpha=1.0, clip=1.0, ta_scale=0.0, grad_norm=None)
        self._losses = core.LossWindow()
        self.last_loss: Optional[float] = None  # E_t of the last step() call, averaged over ranks

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_flat"):
            raise RuntimeError("AGIP packs all parameters into flat buffers when it is created; "
                               "create a new optimizer with every param group instead of add_param_group")
        super().add_param_group(param_group)  # torch refuses a parameter in two groups
        index = len(self.param_groups) - 1
        check_group(self.param_groups[index], index)
        for p in self.param_groups[index]["params"]:
            where = f" (param group {index})"
            need(not p.is_sparse and p.layout == torch.strided, f"AGIP needs dense parameters{where}; got layout {p.layout}")
            need(p.is_floating_point(), f"AGIP optimizes floating-point parameters only{where}; got dtype {p.dtype}")
            need(p.requires_grad, f"a parameter with requires_grad=False was given{where}: leave frozen parameters "
                 "out of the optimizer (agip.param_groups does)")

    def record_loss(self, loss, *, tokens: Optional[int] = None) -> None:
        """Remember a (micro-batch) loss for the next ``step()`` called without ``loss=``
        (for ``transformers.Trainer``, see :func:`agip.hf.attach`; docs/algorithm.md §0):
        the step takes their mean as E_t, weighted by ``tokens`` (how many tokens each loss
        is a mean over) when they come with it."""
        self._losses.record(loss, tokens)

    # --- the step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One step (docs/algorithm.md §1): finite check, G^2, clip, AdamW, TA, mask.

        ``loss`` is this step's minibatch loss E_t (mean over tokens, after gradient
        accumulation), averaged over ranks here. A non-finite loss or gradient skips the
        step and changes nothing but ``skipped_steps``. Returns the loss (or the closure's).
        """
        loss = self._closure_loss(closure, loss)
        E, flat, t = self._loss_of(loss), self._flat, self._step + 1
        flat.rebind_grads()
        if E is not None and not math.isfinite(E):
            return self._skip(t, "loss", loss)
        ratio, alpha = self.schedule.propose(t, E)
        pruning = self.schedule.is_pruning_step(t)  # never without a target (TAAdamW)
        # scores ahead: the update histograms the next pruning step's scores, which that step
        # may use only if nothing wrote w, v or a mask in place since (torch's version counters)
        plan = core.plan(t, self.param_groups, self.config, pruning and self._selection.in_update,
                         int(math.floor(ratio * flat.n_prunable_global)), self._fisher_b2,
                         score_ahead=self._score_ahead and self.schedule.is_pruning_step(t + 1),
                         ahead_valid=self._stamp is not None and flat.stamp() == self._stamp)
        flat.sync_in()
        G2 = self.comm.sum_sharded(self.backend.grad_sumsq(flat, plan), flat.device)
        if not math.isfinite(G2):
            return self._skip(t, "gradient", loss)
        core.finish_plan(plan, G2, E, self.config)
        decision = self._selection.select(self.backend, flat, plan, ratio) if pruning else None
        self.backend.update(flat, plan)
        if decision is not None:
            decision.finish(flat)
            if decision.compensate is not None and ratio >= self.config.target_sparsity:
                decision.compensate.release()  # the last cut: the hooks and H are not needed any more
        flat.sync_out()
        self._stamp = flat.stamp() if plan.score_ahead else None
        # host-side state changes only after the buffers are updated
        self._step = t
        self.schedule.commit(ratio, E)
        self._last.update(alpha=alpha, clip=plan.clip, ta_scale=plan.ta_scale, grad_norm=math.sqrt(G2))
        if decision is not None:
            self._last.update(theta=decision.theta, regrown=decision.n_regrown)
        return loss

    @staticmethod
    def _closure_loss(closure, loss):
        """torch's closure protocol: the closure's loss unless ``loss=`` is given too."""
        if closure is None:
            return loss
        if not callable(closure):
            raise TypeError("the first argument of step() is a closure; pass the loss as opt.step(loss=loss)")
        with torch.enable_grad():
            closure_loss = closure()
        return closure_loss if loss is None else loss

    def _loss_of(self, loss) -> Optional[float]:
        """E_t (docs/algorithm.md §0): ``loss`` or the recorded mean, averaged over ranks (§6:
        one scalar all-reduce); checked for the TA term (a non-finite one skips the step)."""
        E = self._losses.take(loss, self.config)
        self._late_comm()
        E = None if E is None else self.comm.mean(E, self._flat.device)
        self.last_loss = E  # the harness' history reads it (a skipped step's too)
        need(E is None or not -math.inf < E < 0 or self.config.ta_gamma == 0, f"loss is {E} < 0, but the terminal-attractor "
             "term needs a loss >= 0 (E^beta is undefined); pass ta_gamma=0 for losses that can be negative")
        return E

    def _fisher_beta2(self) -> float:
        """The beta2 that all prunable groups share (algorithm.md §2.1b: the bias correction
        then does not change the order of the Fisher score)."""
        b2 = {g["betas"][1] for g in self.param_groups if g["prune"]}
        if len(b2) > 1 and self.config.saliency == "fisher":
            raise ValueError(
                f"saliency='fisher' ranks |w| * v^p across all prunable groups, which needs one beta2 for all of "
                f"them (else Adam's bias correction would change the order); got beta2 = {sorted(b2)}: give the "
                "prunable groups the same betas, or use saliency='taylor'")
        return b2.pop() if len(b2) == 1 else 0.999

    def _late_comm(self) -> None:
        """Replicated parameters (DDP) of an optimizer built before the process group (e.g.
        handed to ``transformers.Trainer``, whose accelerate initialises it later): take the
        group at the first step once it exists (algorithm.md §6)."""
        if not self.comm.active and self._process_group is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self.comm = self._flat.comm = make_comm([p for g in self.param_groups for p in g["params"]])

    def _skip(self, t: int, what: str, loss):
        """docs/algorithm.md §1.1: a non-finite loss or gradient skips the step; only the counter moves."""
        self.skipped_steps += 1
        if not self._warned_skip:
            warnings.warn(f"AGIP skipped step {t}: non-finite {what} (nothing was updated; skipped_steps counts "
                          "these; this warning is shown once)", RuntimeWarning, stacklevel=3)
            self._warned_skip = True
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero all gradients in place (they stay views of the flat buffer)."""
        self._flat.zero_grad()

    # --- reports --------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps taken (t), skipped steps excluded."""
        return self._step

    def sparsity_report(self) -> dict:
        """Achieved sparsity over the prunable set and over all parameters, per-layer
        density, R_t, theta, regrown count and skipped steps (docs/algorithm.md §2.4)."""
        return state.sparsity_report(self)

    # --- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's layout (``state`` per parameter index, ``param_groups``) plus ``agip``:
        step counters, schedule state, loss window and the last decision."""
        return state.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments, masks, saliency EMA, schedule, loss window and counters; every
        entry is checked before anything is copied, so a mismatched state dict leaves the
        optimizer as it was."""
        state.load_state_dict(self, state_dict)
        self._stamp = None  # the next pruning step histograms its own scores


class AGIP(TAAdamW):
    """Adaptive Gradient-Informed Pruning: the masked TA-AdamW of :class:`TAAdamW` that
    prunes the ``prune=True`` param groups while it trains (docs/algorithm.md §1-3, 5).

    Use ``agip.param_groups(model)`` to build the groups, then call ``opt.step(loss=loss)``
    after ``loss.backward()``. ``preset="default"`` scores weights by the Fisher score
    ``|w| v_t^p`` (``saliency``, ``fisher_power``; algorithm.md §2.1b; ``fisher_moment=
    "previous"`` scores by v_(t-1), which a fused backend histograms without a pass of its
    own) on a cubic ramp without TA; ``preset="thesis"`` is the thesis' method exactly (Taylor ``|w g|``, exp
    ramp with the stability factor, TA). The preset fills ``saliency``, ``fisher_power``,
    ``fisher_moment``, ``schedule``, ``prune_interval``, ``ta_gamma`` and ``stability`` where
    they are None.
    ``sparsity_pattern="2:4"`` (any ``"N:M"``) prunes N of every M weights along the input
    (§2.5); ``nm_mode="decay"`` lets the N:M masks change while the weights outside them decay
    by ``nm_decay`` · R_t/R_target a pruning step, until the ramp ends and they are cut (§2.5b);
    ``nm_input_power=q > 0`` multiplies the N:M score by the input's norm ||X_j||^q, from
    calibration batches handed to :meth:`set_input_norms` (§2.5c).
    Under DDP or FSDP2 every rank makes the decision one process would make for the whole
    model (§6).
    """

    def __init__(self, params, lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 max_grad_norm: Optional[float] = 1.0, ta_gamma: Optional[float] = None, ta_beta: float = 0.5,
                 ta_k: float = 1.0, ta_clip: float = 1.0, ta_eps: float = 1e-8, ta_loss_floor: float = 0.0,
                 target_sparsity: float = 0.3, schedule: Optional[str] = None, total_steps: Optional[int] = None,
                 warmup_steps: Optional[int] = None, tau: Optional[float] = None, prune_interval: Optional[int] = None,
                 regrow_fraction: float = 0.0, saliency_ema: float = 0.0, stability: Optional[bool] = None,
                 stability_window: int = 50, backend: str = "auto", saliency: Optional[str] = None,
                 fisher_power: Optional[float] = None, preset: str = "default", process_group=None,
                 sparsity_pattern: str = "unstructured", fisher_moment: Optional[str] = None, nm_mode: str = "fixed",
                 nm_decay: float = 0.1, ramp_end: float = 0.75, nm_input_power: float = 0.0, compensate: str = "none"):
        cfg = Config.resolve(
            preset, max_grad_norm=max_grad_norm, ta_gamma=ta_gamma, ta_beta=ta_beta, ta_k=ta_k, ta_clip=ta_clip,
            ta_eps=ta_eps, ta_loss_floor=ta_loss_floor, target_sparsity=target_sparsity, schedule=schedule,
            total_steps=total_steps, warmup_steps=warmup_steps, tau=tau, prune_interval=prune_interval,
            regrow_fraction=regrow_fraction, saliency_ema=saliency_ema, stability=stability,
            stability_window=stability_window, saliency=saliency, fisher_power=fisher_power,
            fisher_moment=fisher_moment, sparsity_pattern=sparsity_pattern, nm_mode=nm_mode, nm_decay=nm_decay,
            ramp_end=ramp_end, nm_input_power=nm_input_power, compensate=compensate)
        super().__init__(params, lr, betas, eps, weight_decay, backend=backend, process_group=process_group, config=cfg)
        if cfg.target_sparsity > 0 and self._flat.n_prunable_global == 0:
            raise ValueError(f"target_sparsity={cfg.target_sparsity} but no param group has prune=True: build the "
                             "groups with agip.param_groups(model), or pass target_sparsity=0")
        self._selection = selection.make(self._flat, cfg)
        self._fisher_b2 = self._fisher_beta2()  # refuse prunable groups with different beta2 now
        # the Fisher score of v_(t-1) is known once the previous update has written w and v, so
        # that update histograms it (docs/design.md "Scores ahead"); not under FSDP2, whose
        # weights are copied into the buckets each step (the version counters cannot tell)
        self._score_ahead = cfg.scores_ahead and self._selection.in_update and \
            not any(s.mirrored for b in self._flat.buckets for s in b.slots)

    def track_inputs(self, model) -> None:
        """For ``compensate="obs"`` (docs/algorithm.md §2.6): forward hooks on the modules of
        the prunable weights of ``model`` (the module itself, not a DDP wrapper) add up xᵀx
        of their inputs over every training batch until the target is reached; a pruning
        step's cut then moves the kept weights of the same rows by OBS. Call once, before
        the first training forward."""
        from . import obs

        need(self.config.compensate == "obs", "track_inputs is for compensate='obs'")
        need(self._selection.compensation is None, "track_inputs was called already")
        self._selection.compensation = obs.Compensation(model, self, self.comm)

    @torch.no_grad()
    def set_input_norms(self, norms: dict) -> None:
        """The input norms ||X_j|| of every prunable weight, for ``nm_input_power > 0``
        (docs/algorithm.md §2.5c): ``norms`` maps each prunable parameter (or its name in
        ``param_names``) to a vector of its input size (the size along its input dimension),
        finite and >= 0, e.g. ``agip.baselines.input_norms(model, opt, batches)``. Every rank
        of a DDP run must pass the same norms. Kept in the state dict. Checked before
        anything changes."""
        need(self._selection.in_update is False and getattr(self._selection, "input_power", 0) > 0,
             "set_input_norms is for sparsity_pattern='N:M' with nm_input_power > 0 (algorithm.md §2.5c)")
        need(isinstance(norms, dict), f"set_input_norms takes a dict (parameter or name -> vector), got {type(norms)}")
        by_name = {n: p for g in self.param_groups for n, p in zip(g.get("param_names", []), g["params"])}
        want = {id(s.param): s for _, s in self._flat.prunable_slots()}
        got = {}
        for key, norm in norms.items():
            p = by_name.get(key) if isinstance(key, str) else key
            what = key if isinstance(key, str) else "a parameter"
            need(p is not None and id(p) in want, f"set_input_norms: {what} is not a prunable parameter of this "
                 "optimizer (its group needs prune=True)")
            s = want[id(p)]
            size = s.shape[s.input_dim]
            need(isinstance(norm, torch.Tensor) and norm.dim() == 1 and norm.numel() == size and norm.is_floating_point(),
                 f"set_input_norms: the norm of {what} must be a float vector of its input size {size} (dimension "
                 f"{s.input_dim} of {s.shape})")
            need(bool(torch.isfinite(norm).all()) and bool((norm >= 0).all()),
                 f"set_input_norms: the norm of {what} has negative or non-finite entries")
            got[id(p)] = norm.detach().float().to(self._flat.device).clone()
        missing = [s.name for _, s in self._flat.prunable_slots() if id(s.param) not in got]
        need(not missing, f"set_input_norms: no norm for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
             f"({len(missing)} prunable parameters): pass one for every prunable parameter")
        self._selection.set_input_norms(got)

    @torch.no_grad()
    def apply_masks(self, masks: dict) -> None:
        """Set the masks of prunable parameters from outside (baselines such as one-shot
        magnitude or Wanda pruning, or gradual magnitude pruning between steps).

        ``masks`` maps a prunable parameter (or its name in ``param_names``) to a bool
        tensor of its shape (True = keep). Entries set to False get w = m = v = 0 (and a
        zero saliency EMA), as after an AGIP pruning step (docs/algorithm.md §1.6).
        Parameters not in ``masks`` keep their masks. Everything is checked before anything
        changes. For an FSDP2 parameter the mask is a DTensor laid out like it, or its local
        shard's mask.
        """
        slots = {id(s.param): (b, s) for b, s in self._flat.prunable_slots()}
        by_name = {n: p for g in self.param_groups for n, p in zip(g.get("param_names", []), g["params"])}
        todo = []
        for key, mask in masks.items():
            p = by_name.get(key) if isinstance(key, str) else key
            what = key if isinstance(key, str) else "a parameter"
            need(p is not None and id(p) in slots, f"apply_masks: {what} is not a prunable parameter of this "
                 "optimizer (its group needs prune=True)")
            mask = mask.to_local() if is_dtensor(p) and is_dtensor(mask) else mask
            shape = slots[id(p)][1].shape
            need(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == shape,
                 f"apply_masks: the mask of {what} must be a bool tensor of shape {shape}")
            todo.append((p, mask.to(self._flat.device)))
        for p, mask in todo:
            b, s = slots[id(p)]
            self._flat.apply_mask(b, mask.reshape(-1), start=s.start)
            if s.mirrored:  # an FSDP2 local shard: the truth between steps (copied in at the step)
                local(p).masked_fill_(~mask, 0)
