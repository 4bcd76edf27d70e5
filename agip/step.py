"""The host side of one step as plain functions (docs/algorithm.md §1): the loss E_t, the
clip factor, the terminal-attractor scalar, and the :class:`~agip.backends.StepPlan` that
the backends' passes read. The optimizer classes call these in the order of §1.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .backends import GroupHyper, StepPlan


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


def clip_factor(grad_sumsq: float, max_grad_norm: Optional[float]) -> float:
    """c = min(1, max_grad_norm / (sqrt(G^2) + 1e-6)), torch's ``clip_grad_norm_`` (docs/algorithm.md §1.3)."""
    return 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (math.sqrt(grad_sumsq) + 1e-6))


def plan(step: int, param_groups: list, config, prune: bool, k: int, fisher_beta2: float, score_ahead: bool = False,
         ahead_valid: bool = False) -> StepPlan:
    """The plan of step t before G^2 is known: per-group hyper-parameters, whether the
    backend's update computes a new mask (``prune``), k = floor(R_t N), the score's
    constants rounded to fp32 once (every backend multiplies by the very same numbers), and
    whether the update histograms the next step's score (``score_ahead``) and this step may
    use the histogram the last one made (``ahead_valid``; docs/design.md "Scores ahead")."""
    if score_ahead and not config.scores_ahead:
        raise ValueError("score_ahead needs the Fisher score of v_(t-1) (fisher_moment='previous') without a saliency "
                         "EMA: any other score reads this step's gradient or EMA")
    keep, new = StepPlan.ema_constants(config.saliency_ema)
    b2, omb2 = StepPlan.fisher_constants(fisher_beta2) if config.fisher_q >= 0 else (0.0, 0.0)
    if config.fisher_q >= 0 and config.fisher_moment == "previous" and step > 1:
        # v * 1 + 0 * ghat^2 = v exactly: the score reads v_(t-1) as stored. Not at step 1:
        # v_0 = 0 would score every entry 0 and a tie at theta = 0 prunes them all
        b2, omb2 = 1.0, 0.0
    groups: List[GroupHyper] = [GroupHyper(g["lr"], g["weight_decay"], g["betas"][0], g["betas"][1], g["eps"])
                                for g in param_groups]
    return StepPlan(step=step, clip=1.0, ta_scale=0.0, groups=groups, prune=prune, k=k,
                    regrow_fraction=config.regrow_fraction, ema_keep=keep, ema_new=new,
                    fisher_q=config.fisher_q, fisher_beta2=b2, fisher_omb2=omb2, score_ahead=score_ahead,
                    ahead_valid=ahead_valid)


def finish_plan(p: StepPlan, grad_sumsq: float, loss: Optional[float], config) -> None:
    """Once G^2 is summed: the clip factor (§1.3) and the TA scalar (§1.5) from E_t and Ĝ² = c² G²."""
    p.clip = clip_factor(grad_sumsq, config.max_grad_norm)
    if loss is not None:
        p.ta_scale = ta_scale(loss, p.clip * p.clip * grad_sumsq, config.ta_gamma, config.ta_beta, config.ta_k,
                              config.ta_clip, config.ta_eps, config.ta_loss_floor)


def as_float(loss, what: str = "loss") -> float:
    """A scalar loss (float or one-element tensor) as a Python float."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{what} must be a scalar (0-d tensor or float), got shape {tuple(loss.shape)}; "
                             "use loss.mean()")
        return float(loss.detach())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"{what} must be a float or a 0-d tensor, got {type(loss).__name__}")


class LossWindow:
    """The losses recorded since the last step (``record_loss``; for trainers that call
    ``step()`` themselves): a step without ``loss=`` uses their mean, which is E_t under
    gradient accumulation (docs/algorithm.md §0) — weighted by the tokens each is a mean
    over when they come with ``tokens``."""

    def __init__(self):
        self.recorded: List[float] = []
        self.tokens: List[Optional[int]] = []

    def record(self, loss, tokens: Optional[int] = None) -> None:
        if tokens is not None and not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0):
            raise ValueError(f"record_loss's tokens must be a positive int (the tokens the loss is a mean over), "
                             f"got {tokens!r}")
        if self.tokens and (tokens is None) != (self.tokens[0] is None):
            self.recorded, self.tokens = [], []
            raise ValueError("record_loss: a step's losses must all come with tokens= or all without, not a "
                             "mix; the step's recorded losses were dropped")
        self.recorded.append(as_float(loss, "record_loss's loss"))
        self.tokens.append(tokens)

    def take(self, loss, config) -> Optional[float]:
        """E_t for this step: ``loss`` if given, else the recorded (token-weighted) mean;
        None when neither is there and the step can do without (raises when it cannot).
        Empties the window."""
        if loss is None and self.recorded:
            if self.tokens[0] is None:
                loss = sum(self.recorded) / len(self.recorded)
            else:
                loss = sum(x * n for x, n in zip(self.recorded, self.tokens)) / sum(self.tokens)
        self.recorded, self.tokens = [], []
        if loss is not None:
            return as_float(loss)
        if config.needs_loss():
            why = "the terminal-attractor term (ta_gamma > 0)" if config.ta_gamma > 0 \
                else "the stability factor of the sparsity schedule (stability=True)"
            raise TypeError(
                f"AGIP.step() needs this step's loss for {why}: call opt.step(loss=loss) after "
                "loss.backward(), or opt.record_loss(loss) before step() (agip.hf.attach does this for "
                "transformers.Trainer), or pass ta_gamma=0 and stability=False to run without it"
            )
        return None
