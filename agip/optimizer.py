"""The AGIP optimizer: the class owns param groups and state; the math lives in backends.

docs/algorithm.md §1 gives the order of one step; section 2 the pruning decision; section 3
the schedule. ``AGIP.step(loss=...)`` runs them in that order.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from . import backends, nm
from .backends import GroupHyper, StepPlan
from .distributed import is_dtensor, local, make_comm
from .flat import FlatState
from .schedule import SHAPES, SparsitySchedule


def ta_scale(loss: float, ghat_sq: float, gamma: float, beta: float, k: float, clip: float, eps: float,
             loss_floor: float = 0.0) -> float:
    """The terminal-attractor scalar s (docs/algorithm.md §1.5, eq. 4.9-4.15).

    ``s = gamma * tanh(k E') * E'^beta / (Ghat^2 + eps)`` with ``E' = max(E - E_floor, 0)``;
    if the TA vector ``s * g_hat`` (norm ``s * sqrt(Ghat^2)``) is longer than ``clip``
    (eq. 4.12), ``s = clip / sqrt(Ghat^2)``. The step then does ``w -= lr * s * g_hat``.
    """
    if gamma == 0:
        return 0.0
    e = max(loss - loss_floor, 0.0)
    s = gamma * math.tanh(k * e) * e**beta / (ghat_sq + eps)
    norm = math.sqrt(ghat_sq)
    if s * norm > clip:
        s = clip / norm
    return s


SALIENCIES = ("taylor", "fisher")
FISHER_POWERS = {0.0: 0, 0.25: 1, 0.5: 2, 1.0: 4}  # p -> q = 4p: v_t^p with square roots only

# The settings a preset decides (algorithm.md §5). Arguments passed explicitly win.
# "thesis": the thesis' method exactly. "default": the product default, chosen on
# validation data (README, "Quality study": four candidates at 50% sparsity, 100 steps of
# SmolLM2-135M, by in-domain and out-of-domain validation perplexity): the Fisher score of
# algorithm.md §2.1b with p = 1/4 on a cubic ramp, a pruning step every step, no TA.
PRESETS = {
    "thesis": dict(saliency="taylor", fisher_power=0.5, schedule="exp", prune_interval=1, ta_gamma=1.0,
                   stability=True),
    "default": dict(saliency="fisher", fisher_power=0.25, schedule="cubic", prune_interval=1, ta_gamma=0.0,
                    stability=False),
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class AGIP(torch.optim.Optimizer):
    """Adaptive Gradient-Informed Pruning: a masked AdamW with a terminal-attractor term
    that prunes the ``prune=True`` param groups while it trains (docs/algorithm.md §1-3, 5).

    Use ``agip.param_groups(model)`` to build the groups, then call
    ``opt.step(loss=loss)`` after ``loss.backward()``. Parameters and their gradients
    become views into flat buffers (docs/design.md): create the optimizer after moving the
    model to its device and dtype. ``zero_grad`` always zeroes in place (gradients stay
    bound to the buffers), whatever ``set_to_none`` says.

    ``preset="default"`` scores weights by the Fisher score ``|w| v_t^p`` (``saliency``,
    ``fisher_power``; algorithm.md §2.1b) on a cubic ramp without TA; ``preset="thesis"``
    is the thesis' method exactly (Taylor ``|w g|``, exp ramp with the stability factor,
    TA). The preset fills ``saliency``, ``fisher_power``, ``schedule``, ``prune_interval``,
    ``ta_gamma`` and ``stability`` where they are left as None (algorithm.md §5).

    Under DDP or FSDP2 (algorithm.md §6) every rank makes the decision one process would
    make for the whole model: build AGIP on the model (FSDP2: after ``fully_shard``); it
    averages the loss over ranks and, for FSDP2's shards, sums G^2 and the threshold's
    histograms. ``process_group`` is the data-parallel group (default: the FSDP2 mesh's,
    else the world when ``torch.distributed`` is initialised).
    """

    _prunes = True  # TAAdamW turns pruning off

    def __init__(
        self,
        params,
        lr: float = 5e-5,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        max_grad_norm: Optional[float] = 1.0,
        ta_gamma: Optional[float] = None,
        ta_beta: float = 0.5,
        ta_k: float = 1.0,
        ta_clip: float = 1.0,
        ta_eps: float = 1e-8,
        ta_loss_floor: float = 0.0,
        target_sparsity: float = 0.3,
        schedule: Optional[str] = None,
        total_steps: Optional[int] = None,
        warmup_steps: Optional[int] = None,
        tau: Optional[float] = None,
        prune_interval: Optional[int] = None,
        regrow_fraction: float = 0.0,
        saliency_ema: float = 0.0,
        stability: Optional[bool] = None,
        stability_window: int = 50,
        backend: str = "auto",
        saliency: Optional[str] = None,
        fisher_power: Optional[float] = None,
        preset: str = "default",
        process_group=None,
        sparsity_pattern: str = "unstructured",
    ):
        _check(preset in PRESETS, f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        chosen = PRESETS[preset]
        ta_gamma = chosen["ta_gamma"] if ta_gamma is None else ta_gamma
        schedule = chosen["schedule"] if schedule is None else schedule
        prune_interval = chosen["prune_interval"] if prune_interval is None else prune_interval
        stability = chosen["stability"] if stability is None else stability
        saliency = chosen["saliency"] if saliency is None else saliency
        fisher_power = chosen["fisher_power"] if fisher_power is None else fisher_power
        _check(saliency in SALIENCIES, f"saliency must be one of {SALIENCIES}, got {saliency!r}")
        _check(_number(fisher_power) and float(fisher_power) in FISHER_POWERS,
               f"fisher_power must be one of {sorted(FISHER_POWERS)} (v_t^p is computed with square roots "
               f"so that every backend rounds alike), got {fisher_power!r}")
        _check(max_grad_norm is None or (_number(max_grad_norm) and max_grad_norm > 0),
               f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")
        _check(_number(ta_gamma) and ta_gamma >= 0, f"ta_gamma must be >= 0 (0 disables TA), got {ta_gamma!r}")
        _check(_number(ta_beta) and 0 < ta_beta < 1, f"ta_beta must be in (0, 1), got {ta_beta!r}")
        _check(_number(ta_k) and ta_k > 0, f"ta_k must be > 0, got {ta_k!r}")
        _check(_number(ta_clip) and ta_clip > 0, f"ta_clip must be > 0, got {ta_clip!r}")
        _check(_number(ta_eps) and ta_eps > 0, f"ta_eps must be > 0, got {ta_eps!r}")
        _check(_number(ta_loss_floor) and ta_loss_floor >= 0, f"ta_loss_floor must be >= 0, got {ta_loss_floor!r}")
        _check(_number(target_sparsity) and 0 <= target_sparsity < 1,
               f"target_sparsity must be in [0, 1), got {target_sparsity!r}")
        _check(schedule in SHAPES, f"schedule must be one of {SHAPES}, got {schedule!r}")
        _check(_number(regrow_fraction) and 0 <= regrow_fraction <= 1,
               f"regrow_fraction must be in [0, 1], got {regrow_fraction!r}")
        _check(_number(saliency_ema) and 0 <= saliency_ema < 1, f"saliency_ema must be in [0, 1), got {saliency_ema!r}")
        _check(isinstance(backend, str), f"backend must be a string, got {type(backend).__name__}")
        self._nm = nm.parse(sparsity_pattern)
        if self._nm:
            n, m = self._nm
            _check(target_sparsity <= n / m + 1e-12, f"sparsity_pattern {sparsity_pattern!r} prunes at most {n}/{m} = "
                   f"{n / m:g} of the prunable weights (all groups); got target_sparsity={target_sparsity!r}")
            _check(regrow_fraction == 0, "regrowth (regrow_fraction > 0) is for sparsity_pattern='unstructured' only")
        self._check_hyper(lr, betas, eps, weight_decay, where="")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, prune=False)
        super().__init__(params, defaults)

        self.config = dict(
            max_grad_norm=max_grad_norm, ta_gamma=float(ta_gamma), ta_beta=float(ta_beta), ta_k=float(ta_k),
            ta_clip=float(ta_clip), ta_eps=float(ta_eps), ta_loss_floor=float(ta_loss_floor),
            target_sparsity=float(target_sparsity), schedule=schedule, total_steps=total_steps,
            warmup_steps=warmup_steps, tau=tau, prune_interval=prune_interval,
            regrow_fraction=float(regrow_fraction), saliency_ema=float(saliency_ema),
            stability=bool(stability), stability_window=stability_window, saliency=saliency,
            fisher_power=float(fisher_power), preset=preset, sparsity_pattern=sparsity_pattern,
        )
        self.schedule = SparsitySchedule(
            target_sparsity, schedule, total_steps, warmup_steps, tau, prune_interval, stability, stability_window
        )
        if not self._prunes:
            for g in self.param_groups:
                g["prune"] = False
        self._process_group = process_group
        self.comm = make_comm([p for g in self.param_groups for p in g["params"]], process_group)
        self._flat = FlatState(self.param_groups, saliency_ema=saliency_ema > 0 and self._prunes, comm=self.comm)
        if target_sparsity > 0 and self._flat.n_prunable_global == 0:
            raise ValueError(
                f"target_sparsity={target_sparsity} but no param group has prune=True: build the groups "
                "with agip.param_groups(model), or pass target_sparsity=0"
            )
        if self._nm:
            if self.comm.sharded:
                raise ValueError("sparsity_pattern N:M is not supported on FSDP2 shards yet: use DDP, or 'unstructured'")
            nm.check_layout(self._flat, self._nm[1])
            self._nm_groups = nm.groups_total(self._flat, self._nm[1])
        if saliency == "fisher":
            self._fisher_beta2()  # refuse prunable groups with different beta2 now, not at the first step
        self.backend = backends.resolve(backend, self._flat.device)
        for b in self._flat.buckets:
            for s in b.slots:
                st = self.state[s.param]
                sl = slice(s.start, s.start + s.numel)
                st["exp_avg"] = b.m[sl].view(s.shape)  # an FSDP2 parameter's: its local shard's
                st["exp_avg_sq"] = b.v[sl].view(s.shape)
                if s.start < b.n_prunable:
                    st["mask"] = b.mask[sl].view(s.shape)
                    if b.ema is not None:
                        st["saliency_ema"] = b.ema[sl].view(s.shape)
        self._step = 0
        self.skipped_steps = 0
        self._last = dict(theta=None, regrown=0, alpha=1.0, clip=1.0, ta_scale=0.0, grad_norm=None)
        self._warned_skip = False
        self._recorded = []  # losses recorded since the last step (record_loss)

    # --- input checks ---------------------------------------------------------------
    @staticmethod
    def _check_hyper(lr, betas, eps, weight_decay, where: str) -> None:
        _check(_number(lr) and lr >= 0, f"lr must be a number >= 0{where}, got {lr!r}")
        _check(isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
               f"betas must be two numbers in [0, 1){where}, got {betas!r}")
        _check(_number(eps) and eps >= 0, f"eps must be a number >= 0{where}, got {eps!r}")
        _check(_number(weight_decay) and weight_decay >= 0, f"weight_decay must be a number >= 0{where}, got {weight_decay!r}")

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_flat"):
            raise RuntimeError(
                "AGIP packs all parameters into flat buffers when it is created; "
                "create a new optimizer with every param group instead of add_param_group"
            )
        super().add_param_group(param_group)  # torch refuses a parameter in two groups
        g = self.param_groups[-1]
        where = f" (param group {len(self.param_groups) - 1})"
        self._check_hyper(g["lr"], g["betas"], g["eps"], g["weight_decay"], where)
        _check(isinstance(g["prune"], bool), f"'prune' must be True or False{where}, got {g['prune']!r}")
        for p in g["params"]:
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"AGIP needs dense parameters{where}; got layout {p.layout}")
            if not p.is_floating_point():
                raise ValueError(f"AGIP optimizes floating-point parameters only{where}; got dtype {p.dtype}")
            if not p.requires_grad:
                raise ValueError(
                    f"a parameter with requires_grad=False was given{where}: leave frozen parameters "
                    "out of the optimizer (agip.param_groups does)"
                )

    def _late_comm(self) -> None:
        """Replicated parameters (DDP) of an optimizer built before the process group (e.g.
        handed to ``transformers.Trainer``, whose accelerate initialises it later): take the
        group at the first step once it exists (algorithm.md §6)."""
        if not self.comm.active and self._process_group is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self.comm = self._flat.comm = make_comm([p for g in self.param_groups for p in g["params"]])

    def _fisher_beta2(self) -> float:
        """The beta2 that all prunable groups share (algorithm.md §2.1b: the bias correction
        then does not change the order of the Fisher score)."""
        b2 = {g["betas"][1] for g in self.param_groups if g["prune"]}
        if len(b2) > 1:
            raise ValueError(
                f"saliency='fisher' ranks |w| * v^p across all prunable groups, which needs one beta2 for all of "
                f"them (else Adam's bias correction would change the order); got beta2 = {sorted(b2)}: give the "
                "prunable groups the same betas, or use saliency='taylor'"
            )
        return b2.pop() if b2 else 0.999

    def record_loss(self, loss) -> None:
        """Remember a (micro-batch) loss for the next ``step()`` called without ``loss=``.

        For trainers that call ``optimizer.step()`` themselves (``transformers.Trainer``,
        see :func:`agip.hf.attach`): the next step uses the mean of the losses recorded
        since the last one, which is E_t under gradient accumulation (docs/algorithm.md §0).
        """
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"record_loss takes a scalar loss, got shape {tuple(loss.shape)}")
            loss = float(loss.detach())
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise TypeError(f"record_loss takes a float or a 0-d tensor, got {type(loss).__name__}")
        self._recorded.append(float(loss))

    def _loss_value(self, loss) -> Optional[float]:
        needs = self.config["ta_gamma"] > 0 or (self.config["stability"] and self.schedule.target > 0)
        if loss is None and self._recorded:
            loss = sum(self._recorded) / len(self._recorded)
        self._recorded = []
        if loss is None:
            if needs:
                why = "the terminal-attractor term (ta_gamma > 0)" if self.config["ta_gamma"] > 0 \
                    else "the stability factor of the sparsity schedule (stability=True)"
                raise TypeError(
                    f"AGIP.step() needs this step's loss for {why}: call opt.step(loss=loss) after "
                    "loss.backward(), or opt.record_loss(loss) before step() (agip.hf.attach does this for "
                    "transformers.Trainer), or pass ta_gamma=0 and stability=False to run without it"
                )
            return None
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar (0-d tensor or float), got shape {tuple(loss.shape)}; use loss.mean()")
            return float(loss.detach())
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return float(loss)
        raise TypeError(f"loss must be a float or a 0-d tensor, got {type(loss).__name__}")

    # --- the step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One AGIP step (docs/algorithm.md §1): finite check, G^2, clip, AdamW, TA, mask.

        ``loss`` is this step's minibatch loss E_t (mean over tokens, after gradient
        accumulation). A non-finite loss or gradient skips the step and changes nothing
        but ``skipped_steps``. Returns the loss (or the closure's).
        """
        if closure is not None:
            if not callable(closure):
                raise TypeError("the first argument of step() is a closure; pass the loss as opt.step(loss=loss)")
            with torch.enable_grad():
                closure_loss = closure()
            if loss is None:
                loss = closure_loss
        E = self._loss_value(loss)
        self._late_comm()
        if E is not None:  # algorithm.md §6: E_t is the mean over ranks (one scalar all-reduce)
            E = self.comm.mean(E, self._flat.device)
        cfg = self.config
        flat = self._flat
        flat.rebind_grads()
        t = self._step + 1
        if E is not None and not math.isfinite(E):
            return self._skip(t, "loss", loss)
        if E is not None and E < 0 and cfg["ta_gamma"] > 0:
            raise ValueError(
                f"loss is {E} < 0, but the terminal-attractor term needs a loss >= 0 (E^beta is undefined); "
                "pass ta_gamma=0 for losses that can be negative"
            )
        ratio, alpha = self.schedule.propose(t, E)
        keep, new = StepPlan.ema_constants(cfg["saliency_ema"])
        plan = StepPlan(
            step=t, clip=1.0, ta_scale=0.0,
            groups=[GroupHyper(g["lr"], g["weight_decay"], g["betas"][0], g["betas"][1], g["eps"]) for g in self.param_groups],
            prune=self.schedule.is_pruning_step(t),
            k=int(math.floor(ratio * flat.n_prunable_global)),
            regrow_fraction=cfg["regrow_fraction"], ema_keep=keep, ema_new=new,
        )
        if cfg["saliency"] == "fisher":
            plan.fisher_q = FISHER_POWERS[cfg["fisher_power"]]
            plan.fisher_beta2, plan.fisher_omb2 = StepPlan.fisher_constants(self._fisher_beta2())
        flat.sync_in()
        G2 = self.comm.sum_sharded(self.backend.grad_sumsq(flat, plan), flat.device)
        if not math.isfinite(G2):
            return self._skip(t, "gradient", loss)
        mgn = cfg["max_grad_norm"]
        plan.clip = 1.0 if mgn is None else min(1.0, mgn / (math.sqrt(G2) + 1e-6))
        ghat_sq = plan.clip * plan.clip * G2
        if E is not None:
            plan.ta_scale = ta_scale(E, ghat_sq, cfg["ta_gamma"], cfg["ta_beta"], cfg["ta_k"],
                                     cfg["ta_clip"], cfg["ta_eps"], cfg["ta_loss_floor"])
        regrown, nm_masks = 0, None
        if plan.prune and self._nm:  # algorithm.md §2.5: one shared pass; the backend's update prunes nothing
            n, m = self._nm
            nm_masks, nm_theta = nm.select(flat, plan, n, m, nm.groups_to_prune(ratio, n, m, self._nm_groups))
            plan.prune = False
        if plan.prune:
            sel = self.backend.select(flat, plan)
            plan.theta, plan.regrow_theta, regrown = sel.theta, sel.regrow_theta, sel.n_regrown
        self.backend.update(flat, plan)
        if nm_masks is not None:
            nm.apply(flat, nm_masks)
            plan.prune, plan.theta = True, nm_theta
        flat.sync_out()
        # commit host-side state only after the buffers are updated
        self._step = t
        self.schedule.commit(ratio, E)
        self._last.update(alpha=alpha, clip=plan.clip, ta_scale=plan.ta_scale, grad_norm=math.sqrt(G2))
        if plan.prune:
            self._last.update(theta=plan.theta, regrown=regrown)
        return loss

    @torch.no_grad()
    def apply_masks(self, masks: dict) -> None:
        """Set the masks of prunable parameters from outside (baselines such as one-shot
        magnitude or Wanda pruning, or gradual magnitude pruning between steps).

        ``masks`` maps a prunable parameter (or its name in ``param_names``) to a bool
        tensor of its shape (True = keep). Entries set to False get w = m = v = 0 (and a
        zero saliency EMA), as after an AGIP pruning step (docs/algorithm.md §1.6). Parameters not in
        ``masks`` keep their masks. Everything is checked before anything changes. For an
        FSDP2 parameter the mask is a DTensor laid out like it, or its local shard's mask.
        """
        by_name = {n: p for g in self.param_groups for n, p in zip(g.get("param_names", []), g["params"])}
        todo = []
        for key, mask in masks.items():
            p = by_name.get(key) if isinstance(key, str) else key
            if p is None or p not in self.state or "mask" not in self.state[p]:
                raise ValueError(f"apply_masks: {key if isinstance(key, str) else 'a parameter'} is not a prunable "
                                 "parameter of this optimizer (its group needs prune=True)")
            if is_dtensor(p) and is_dtensor(mask):
                mask = mask.to_local()
            shape = tuple(self.state[p]["mask"].shape)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
                raise ValueError(f"apply_masks: the mask of {key if isinstance(key, str) else 'a parameter'} must be "
                                 f"a bool tensor of shape {shape}")
            todo.append((p, mask.to(self._flat.device)))
        for p, mask in todo:
            st = self.state[p]
            st["mask"].copy_(mask)
            drop = ~mask
            local(p).masked_fill_(drop, 0)  # the bucket itself, or an FSDP2 local shard (copied in at the step)
            st["exp_avg"].masked_fill_(drop, 0)
            st["exp_avg_sq"].masked_fill_(drop, 0)
            if "saliency_ema" in st:
                st["saliency_ema"].masked_fill_(drop, 0)

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
        flat = self._flat
        names, sums, sizes = [], [], []
        for b, s in flat.prunable_slots():
            names.append(s.name)
            sums.append(b.mask[s.start : s.start + s.numel].sum())
            sizes.append(s.numel)
        if sums:  # per layer, summed over ranks when sharded (algorithm.md §6)
            counts = torch.stack([torch.stack(sums).to(torch.int64), torch.tensor(sizes, device=flat.device)])
            kept, sizes = flat.comm.sum_counts(counts).tolist()
        else:
            kept = []
        n_pruned = sum(sizes) - sum(kept)
        N, total = flat.n_prunable_global, flat.numel_global
        return {
            "step": self._step,
            "target_sparsity": self.schedule.target,
            "scheduled_sparsity": self.schedule.ratio,
            "sparsity_prunable": n_pruned / N if N else 0.0,
            "sparsity_all": n_pruned / total if total else 0.0,
            "n_pruned": int(n_pruned),
            "n_prunable": N,
            "n_params": total,
            "theta": self._last["theta"],
            "regrown": self._last["regrown"],
            "alpha": self._last["alpha"],
            "grad_norm": self._last["grad_norm"],
            "clip": self._last["clip"],
            "ta_scale": self._last["ta_scale"],
            "skipped_steps": self.skipped_steps,
            "rebound_grads": flat.rebound_grads,
            "rebound_params": flat.rebound_params,
            "layer_density": {n: (k / z if z else 1.0) for n, k, z in zip(names, kept, sizes)},
        }

    # --- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's layout (``state`` per parameter index, ``param_groups``) plus ``agip``:
        step counters, schedule state, loss window and the last decision."""
        sd = super().state_dict()
        sd["agip"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "schedule": self.schedule.state_dict(),
            "last": dict(self._last),
            "config": dict(self.config),
            "world_size": self.comm.world,
            "sharded": self.comm.sharded,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments, masks, saliency EMA, schedule, loss window and counters.

        Everything is checked before anything is copied, so a mismatched state dict
        leaves the optimizer as it was.
        """
        if not isinstance(state_dict, dict) or "agip" not in state_dict:
            raise ValueError("not an AGIP state dict (no 'agip' entry); was it saved from torch.optim.AdamW?")
        saved_world = state_dict["agip"].get("world_size", 1)
        if saved_world != self.comm.world and (state_dict["agip"].get("sharded") or self.comm.sharded):
            raise ValueError(f"this state dict holds the shards of {saved_world} process(es), but this run has "
                             f"{self.comm.world}: resume with --nproc_per_node {saved_world}, or write a full "
                             "checkpoint (agip.distributed.save_full) and start from it")
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer {len(groups)}")
        index, copies = 0, []
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"param group {gi}: state dict has {len(sg['params'])} parameters, optimizer {len(g['params'])}")
            if bool(sg.get("prune", False)) != g["prune"]:
                raise ValueError(f"param group {gi}: 'prune' is {sg.get('prune')} in the state dict, {g['prune']} here")
            for p, pid in zip(g["params"], sg["params"]):
                saved = state_dict["state"].get(pid, {})
                for key, dst in self.state[p].items():
                    if key not in saved:
                        raise ValueError(f"state dict lacks {key!r} for parameter {index} (group {gi})")
                    src = saved[key]
                    if tuple(src.shape) != tuple(dst.shape):
                        raise ValueError(f"{key!r} of parameter {index}: shape {tuple(src.shape)} in the state dict, {tuple(dst.shape)} here")
                    copies.append((dst, src))
                index += 1
        extra = state_dict["agip"]
        saved_cfg = extra.get("config", {})
        changed = sorted(k for k in self.config if k in saved_cfg and saved_cfg[k] != self.config[k])
        if changed:
            warnings.warn(f"resuming with changed settings {changed}; the new values apply from here on", stacklevel=2)
        for dst, src in copies:
            dst.copy_(src)
        for g, sg in zip(groups, saved_groups):
            for key, val in sg.items():
                if key not in ("params", "param_names", "prune"):
                    g[key] = val
        self._step = int(extra["step"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.schedule.load_state_dict(extra["schedule"])
        self._last.update(extra.get("last", {}))


class TAAdamW(AGIP):
    """AdamW with the terminal-attractor term and no pruning (docs/algorithm.md §1 with R_t = 0).

    A drop-in for ``torch.optim.AdamW`` (plus ``clip_grad_norm_``) whose ``step`` takes
    ``loss=``; with ``ta_gamma=0`` it is plain AdamW with gradient clipping.
    """

    _prunes = False

    def __init__(self, params, lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0, ta_gamma: float = 1.0,
                 ta_beta: float = 0.5, ta_k: float = 1.0, ta_clip: float = 1.0, ta_eps: float = 1e-8,
                 ta_loss_floor: float = 0.0, backend: str = "auto"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, ta_gamma=ta_gamma, ta_beta=ta_beta, ta_k=ta_k,
                         ta_clip=ta_clip, ta_eps=ta_eps, ta_loss_floor=ta_loss_floor,
                         target_sparsity=0.0, stability=False, backend=backend)
