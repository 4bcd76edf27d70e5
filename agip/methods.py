"""The pruning methods of the harness, each one small object with the same hooks
(docs/design.md, "Methods in the harness"):

- ``optimizer(cfg, model)``: the optimizer it trains with;
- ``before_training(model, opt, calibration) -> bool``: one-shot pruning before training
  (True when it pruned, so the harness measures the perplexity right after);
- ``after_step(step, opt)``: pruning between steps (GMP, PLATON);
- ``scheduled(step, report) -> float``: the sparsity it aims at after ``step`` steps.

``agip.train.finetune`` calls the hooks and never branches on a method's name. AGIP prunes
inside its optimizer, so its hooks do nothing. The baselines train with the same masked
AdamW (AGIP with ta_gamma=0 and no pruning steps of its own); their masks come from
:mod:`agip.baselines` through ``AGIP.apply_masks``.
"""
from __future__ import annotations

from . import baselines


class Method:
    """AGIP itself: the optimizer prunes; the hooks do nothing."""

    name = "agip"
    help = "AGIP: prune inside the optimizer while fine-tuning (the preset decides the score and schedule)"
    takes_nm = True  # whether --sparsity-pattern N:M applies

    def optimizer(self, cfg, model):
        import agip

        return agip.AGIP(agip.param_groups(model, weight_decay=cfg.weight_decay), lr=cfg.lr,
                         weight_decay=cfg.weight_decay, backend=cfg.backend, **cfg.agip_options())

    def __init__(self, cfg=None):
        self.cfg = cfg

    def before_training(self, model, opt, calibration) -> bool:
        # a one-shot start (--init): the solver's weights and masks at step 0 (algorithm.md §2.6)
        init = getattr(self.cfg, "init", None)
        if init:
            baselines.one_shot_start(model, opt, init, calibration())
        # N:M scores times the inputs' norms (nm_input_power > 0, algorithm.md §2.5c): measured
        # on the calibration blocks Wanda uses, once; nothing is pruned here
        if getattr(getattr(opt, "config", None), "nm_input_power", 0.0) > 0:
            opt.set_input_norms(baselines.input_norms(model, opt, calibration()))
        # compensate='obs' (algorithm.md §2.6): H from the training batches' inputs, from now on
        if getattr(getattr(opt, "config", None), "compensate", "none") == "obs":
            opt.track_inputs(model)
        return bool(init)

    def after_step(self, step: int, opt) -> None:
        pass

    def scheduled(self, step: int, report: dict) -> float:
        return report["scheduled_sparsity"]


class Dense(Method):
    name = "adamw"
    help = "dense fine-tuning: AdamW + clipping, no pruning"
    takes_nm = False

    def optimizer(self, cfg, model):  # TAAdamW with ta_gamma=0 is exactly AdamW + clip_grad_norm_
        import agip

        return agip.TAAdamW(agip.param_groups(model, weight_decay=cfg.weight_decay), lr=cfg.lr,
                            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, ta_gamma=0.0,
                            backend=cfg.backend)


class Masked(Method):
    """A baseline: masked AdamW whose masks come from outside the optimizer."""

    takes_nm = False  # GMP and PLATON prune unstructured only

    def __init__(self, cfg):
        self.cfg = cfg

    def optimizer(self, cfg, model):  # no pruning steps of its own: its warm-up lies beyond the run
        import agip

        return agip.AGIP(agip.param_groups(model, weight_decay=cfg.weight_decay), lr=cfg.lr,
                         weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, ta_gamma=0.0,
                         target_sparsity=cfg.target_sparsity, total_steps=cfg.steps, warmup_steps=cfg.steps + 1,
                         stability=False, backend=cfg.backend)

    def scheduled(self, step: int, report: dict) -> float:
        return self.cfg.target_sparsity


class Magnitude(Masked):
    name = "magnitude"
    takes_nm = True
    help = "one-shot global magnitude pruning, then fine-tuning with the mask fixed"

    def before_training(self, model, opt, calibration) -> bool:
        opt.apply_masks(baselines.magnitude_masks(opt, self.cfg.target_sparsity, self.cfg.sparsity_pattern))
        return True


class Wanda(Masked):
    name = "wanda"
    takes_nm = True
    help = "one-shot Wanda (|W|·||X|| per output row), then fine-tuning with the mask fixed"

    def before_training(self, model, opt, calibration) -> bool:
        opt.apply_masks(baselines.wanda_masks(model, opt, self.cfg.target_sparsity, calibration(),
                                              self.cfg.sparsity_pattern))
        return True


class SparseGPT(Masked):
    name = "sparsegpt"
    takes_nm = True
    help = ("one-shot SparseGPT (llmcompressor's SparseGPTModifier, per layer, with its weight updates), then "
            "fine-tuning with the mask fixed; needs the 'baselines' extra")

    def before_training(self, model, opt, calibration) -> bool:
        opt.apply_masks(baselines.sparsegpt_masks(model, opt, self.cfg.target_sparsity, calibration(),
                                                  self.cfg.sparsity_pattern))
        return True


class CubicRamp(Masked):
    """A baseline that re-prunes during training on Zhu & Gupta's cubic ramp (``gmp_ratio``)."""

    def ratio(self, step: int) -> float:
        return baselines.gmp_ratio(step, self.cfg.steps, self.cfg.target_sparsity)

    def scheduled(self, step: int, report: dict) -> float:
        return self.ratio(step)


class GMP(CubicRamp):
    name = "gmp"
    help = "gradual magnitude pruning: cubic schedule, global magnitude threshold, re-applied gmp_events times"

    def __init__(self, cfg):
        super().__init__(cfg)
        # gmp_events evenly spaced re-prunings, the last one after the last step
        self.events = {round(i * cfg.steps / cfg.gmp_events) for i in range(1, cfg.gmp_events + 1)}

    def after_step(self, step: int, opt) -> None:
        if step in self.events:
            opt.apply_masks(baselines.magnitude_masks(opt, self.ratio(step)))


class Platon(CubicRamp):
    name = "platon"
    help = ("PLATON (Zhang et al. 2022): the smoothed Taylor score EMA(|w·g|)·EMA(uncertainty), global masks after "
            "every step on GMP's cubic ramp (host-side baseline, 8 extra bytes per prunable weight)")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.score = baselines.PlatonScore()

    def after_step(self, step: int, opt) -> None:
        self.score.update(opt)
        ratio = self.ratio(step)
        if ratio > 0:
            opt.apply_masks(self.score.masks(ratio))


METHODS = {"agip": Method, "adamw": Dense, "gmp": GMP, "magnitude": Magnitude, "wanda": Wanda,
           "sparsegpt": SparseGPT, "platon": Platon}


def make(cfg) -> Method:
    """The method object of ``cfg.method``."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {tuple(METHODS)}, got {cfg.method!r}")
    cls = METHODS[cfg.method]
    return cls(cfg) if issubclass(cls, Masked) or cls is Method else cls()
