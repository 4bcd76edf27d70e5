"""The sparsity schedule R_t with the loss-stability factor (docs/algorithm.md §3, eq. 4.6, 4.7)."""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

SHAPES = ("exp", "cubic", "oneshot")


class SparsitySchedule:
    """Owns R_t and the window of recent losses; the math is in :meth:`base` and :meth:`alpha`.

    ``target`` is R_target over the prunable set. ``total_steps`` (T), when known, gives the
    defaults ``t_warmup = floor(0.05 T)``, ``tau = 0.15 T``, ``t_end = ramp_end · T`` (0.75 T) and makes the
    last pruning step at or before T snap to exactly ``target`` (docs/algorithm.md §3).
    """

    def __init__(
        self,
        target: float,
        shape: str = "exp",
        total_steps: Optional[int] = None,
        warmup_steps: Optional[int] = None,
        tau: Optional[float] = None,
        prune_interval: int = 1,
        stability: bool = True,
        stability_window: int = 50,
        ramp_end: float = 0.75,
    ):
        if shape not in SHAPES:
            raise ValueError(f"schedule must be one of {SHAPES}, got {shape!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an int >= 0 or None, got {warmup_steps!r}")
        if tau is not None and not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau must be a number > 0 or None, got {tau!r}")
        if not isinstance(prune_interval, int) or prune_interval < 1:
            raise ValueError(f"prune_interval must be an int >= 1, got {prune_interval!r}")
        if not (isinstance(ramp_end, (int, float)) and 0 < ramp_end <= 1):
            raise ValueError(f"ramp_end must be in (0, 1] (the share of total_steps where the cubic ramp ends), "
                             f"got {ramp_end!r}")
        if not isinstance(stability_window, int) or stability_window < 2:
            raise ValueError(f"stability_window must be an int >= 2, got {stability_window!r}")
        self.target = float(target)
        self.shape = shape
        self.total_steps = total_steps
        self.prune_interval = prune_interval
        self.stability = bool(stability)
        self.stability_window = stability_window
        T = total_steps
        if warmup_steps is None:
            warmup_steps = int(0.05 * T) if T is not None else (0 if shape == "oneshot" else None)
        if tau is None and T is not None:
            tau = 0.15 * T
        if self.target > 0:
            if warmup_steps is None:
                raise ValueError(
                    f"schedule={shape!r} needs total_steps (to derive warmup_steps) or warmup_steps"
                )
            if shape == "exp" and tau is None:
                raise ValueError("schedule='exp' needs total_steps (to derive tau) or tau")
            if shape == "cubic" and T is None:
                raise ValueError("schedule='cubic' needs total_steps (it ramps until 0.75 * total_steps)")
        self.warmup_steps = warmup_steps if warmup_steps is not None else 0
        self.tau = float(tau) if tau is not None else None
        self.t_end = ramp_end * T if T is not None else None
        # The last pruning step at or before T: there R_t snaps to the target.
        if T is not None and T >= self.warmup_steps:
            self.final_prune_step = self.warmup_steps + ((T - self.warmup_steps) // prune_interval) * prune_interval
        else:
            self.final_prune_step = None
        self.ratio = 0.0  # R_{t-1}: the sparsity in force
        self.losses: deque = deque(maxlen=stability_window)

    # --- the math -------------------------------------------------------------------
    def is_pruning_step(self, t: int) -> bool:
        """docs/algorithm.md §2: any t >= t_warmup with (t - t_warmup) % prune_interval == 0."""
        return self.target > 0 and t >= self.warmup_steps and (t - self.warmup_steps) % self.prune_interval == 0

    def base(self, t: int) -> float:
        """R_base(t) (eq. 4.6 for ``exp``; Zhu & Gupta's cubic; ``oneshot``)."""
        if t < self.warmup_steps:
            return 0.0
        dt = t - self.warmup_steps
        if self.shape == "exp":
            return self.target * (1.0 - math.exp(-dt / self.tau))
        if self.shape == "cubic":
            span = self.t_end - self.warmup_steps
            frac = 1.0 if span <= 0 else min(1.0, dt / span)
            return self.target * (1.0 - (1.0 - frac) ** 3)
        return self.target

    @staticmethod
    def alpha_of(losses) -> float:
        """Stability factor (eq. 4.7): 1 / (1 + sigma_E / mean_E) over the loss window.

        Population standard deviation; |mean| guards the (TA-off only) case of negative
        losses; fewer than two losses, or a zero mean, give 1.
        """
        n = len(losses)
        if n < 2:
            return 1.0
        mean = sum(losses) / n
        if mean == 0:
            return 1.0
        var = sum((x - mean) ** 2 for x in losses) / n
        return 1.0 / (1.0 + math.sqrt(var) / abs(mean))

    def propose(self, t: int, loss: Optional[float]):
        """R_t and alpha for step t, given this step's (finite) loss; changes nothing.

        R_t = clamp(max(R_{t-1}, alpha * R_base(t)), 0, R_target) on pruning steps
        (the sparsity in force otherwise); exactly R_target on the final pruning step.
        """
        if not self.is_pruning_step(t):
            return self.ratio, 1.0
        if self.final_prune_step is not None and t >= self.final_prune_step:
            return self.target, 1.0
        alpha = 1.0
        if self.stability:
            window = list(self.losses) + ([loss] if loss is not None else [])
            alpha = self.alpha_of(window[-self.stability_window:])
        r = max(self.ratio, alpha * self.base(t))
        return min(max(r, 0.0), self.target), alpha

    def commit(self, ratio: float, loss: Optional[float]) -> None:
        self.ratio = ratio
        if loss is not None:
            self.losses.append(float(loss))

    # --- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ratio": self.ratio, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.ratio = float(state["ratio"])
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.stability_window)
