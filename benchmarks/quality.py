"""Quality study: AGIP against the standard pruning baselines on the same model, data and
budget (the same steps, tokens, LR schedule and seed for every method), in phases:

1. ``lr``: dense fine-tuning at each of LRS; the lr with the best validation perplexity
   is then used for every method;
2. ``select``: AGIP candidates for the product default at the largest target, chosen by
   validation perplexity (the geometric mean of wiki-mini's and pydoc's validation
   splits: in domain and out of domain);
3. ``nm``: AGIP's 2:4 candidates at 50% (fixed groups or changing masks, two score powers),
   chosen the same way;
4. ``distill``: distillation's terms (KL, KL + SquareHead; teacher: the model before
   pruning) on the chosen 2:4 mode, chosen the same way;
5. ``grid``: dense; GMP; one-shot magnitude + FT; Wanda + FT; AGIP with the thesis preset;
   AGIP with the chosen default; at each target, three seeds for dense, Wanda + FT and
   the default at the largest target; the default in the 2:4 pattern at 50%;
6. ``lr24``: the chosen 2:4 mode and the 2:4 baselines + FT (Wanda, SparseGPT) at the
   larger learning rates of LRS_24 (seed 0): a 2:4 model starts far more damaged than an
   unstructured one, so the lr dense fine-tuning chose may be too small for it. Each method
   gets the lr that measures best on validation in a table of its own; the grid keeps the
   study's lr for every row;
7. ``lr50``: the same for the unstructured rows that lead at 50% (the default, Wanda + FT,
   PLATON, SparseGPT + FT).

Every run also measures the test splits of wiki-mini and of the out-of-domain ``pydoc``
corpus (never trained on). Results go to ``study-<steps>.json`` after every run, and a run
already recorded there is not run again: stop the study at any time and start it again
to continue. ``--report-only`` rebuilds the table and plot.

    python benchmarks/quality.py                    # SmolLM2-135M on wiki-mini, 100 steps (~8 min a run on 2 cores)
    python benchmarks/quality.py --phase lr select  # only the first phases
    python benchmarks/quality.py --quick --model DIR --dataset DIR   # 2 steps, tiny: the tests run this
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _checkout  # noqa: E402,F401  (this checkout's agip, its root off sys.path)

from agip import checkpoint  # noqa: E402
from agip.precision import cpu_name  # noqa: E402
from agip.train import EvalCache, FinetuneConfig, finetune  # noqa: E402

LRS = (5e-5, 1e-4, 2e-4)
# candidates for the product default: (label, overrides of FinetuneConfig)
CANDIDATES = [
    ("Fisher p=1/2, cubic, every step", dict(saliency="fisher", fisher_power=0.5, schedule="cubic", prune_interval=1,
                                              ta_gamma=0.0, stability=False)),
    ("Fisher p=1/4, cubic, every step", dict(saliency="fisher", fisher_power=0.25, schedule="cubic", prune_interval=1,
                                              ta_gamma=0.0, stability=False)),
    ("Fisher p=1/2, exp + stability", dict(saliency="fisher", fisher_power=0.5, schedule="exp", prune_interval=1,
                                            ta_gamma=0.0, stability=True)),
    ("Fisher p=1/2, cubic, every 10 steps", dict(saliency="fisher", fisher_power=0.5, schedule="cubic",
                                                  prune_interval=10, ta_gamma=0.0, stability=False)),
]
# candidates for the 2:4 mode at 50%, each on top of the chosen default's overrides
NM_CANDIDATES = [
    ("2:4, fixed groups, Fisher p=1/4", dict(sparsity_pattern="2:4", fisher_power=0.25)),
    ("2:4, fixed groups, Fisher p=1/2", dict(sparsity_pattern="2:4", fisher_power=0.5)),
    ("2:4, changing masks (decay 0.1), Fisher p=1/4", dict(sparsity_pattern="2:4", nm_mode="decay", nm_decay=0.1,
                                                           fisher_power=0.25)),
    # the ramp ending at 0.4 T instead of 0.75 T: more steps to recover with the final 2:4 masks
    ("2:4, changing masks (decay 0.1), Fisher p=1/4, ramp to 0.4T", dict(sparsity_pattern="2:4", nm_mode="decay",
                                                                         nm_decay=0.1, fisher_power=0.25,
                                                                         ramp_end=0.4)),
    # ... ranked by the score times each input's norm^(1/2) (algorithm.md §2.5c): within a group,
    # Wanda's order |w|·||X_j|| where the Fisher score only estimates ||X_j||^(1/2) from v
    ("2:4, changing masks (decay 0.1), Fisher p=1/4 x input norm^(1/2), ramp to 0.4T",
     dict(sparsity_pattern="2:4", nm_mode="decay", nm_decay=0.1, fisher_power=0.25, ramp_end=0.4,
          nm_input_power=0.5)),
    # Wanda + FT 2:4 beats the line above: is it Wanda's score (|w|·||X_j||, no v), or its
    # 100 steps with the final masks? One candidate each: Wanda's score in the decay mode, and
    # a ramp half as long with a decay twice as fast (the weights outside the masks still end
    # near 0.85^20 ≈ 4% of their size, as 0.925^40 does above)
    ("2:4, changing masks (decay 0.1), |w| x input norm (Wanda's score), ramp to 0.4T",
     dict(sparsity_pattern="2:4", nm_mode="decay", nm_decay=0.1, fisher_power=0.0, ramp_end=0.4,
          nm_input_power=1.0)),
    ("2:4, changing masks (decay 0.2), Fisher p=1/4 x input norm^(1/2), ramp to 0.2T",
     dict(sparsity_pattern="2:4", nm_mode="decay", nm_decay=0.2, fisher_power=0.25, ramp_end=0.2,
          nm_input_power=0.5)),
    # both lines above beat the one before them on validation: together
    ("2:4, changing masks (decay 0.2), |w| x input norm (Wanda's score), ramp to 0.2T",
     dict(sparsity_pattern="2:4", nm_mode="decay", nm_decay=0.2, fisher_power=0.0, ramp_end=0.2,
          nm_input_power=1.0)),
]
# distillation's candidates (teacher: the model before pruning), chosen on the 2:4 mode, where
# the gap to dense is largest; then given to the baselines and the default alike in the grid
DISTILL_CANDIDATES = [
    ("KL, T=1", dict(distill_kl=1.0)),
    ("KL + SquareHead", dict(distill_kl=1.0, distill_hidden=1.0)),
    ("SquareHead", dict(distill_hidden=1.0)),
]
# the lr24 phase's learning rates, beside the study's (4e-4: 2e-4 measured best for every 2:4
# method, at the edge of the grid)
LRS_24 = (2e-4, 4e-4)
# issue 36's 2:4 candidates (``init24``), each at 50% 2:4, seed 0: a one-shot start (AGIP's own
# SparseGPT or Wanda at step 0, then AGIP's training) with fixed masks or with the chosen 2:4
# mode's changing masks; "mode" stands for the chosen 2:4 mode's overrides, "default" for the
# default's. (--init wanda with fixed masks is Wanda + FT: tests/test_obs.py shows it equal.)
INIT_CANDIDATES = [
    ("2:4, --init sparsegpt, fixed masks", "default", dict(sparsity_pattern="2:4", init="sparsegpt")),
    ("2:4, --init sparsegpt, changing masks (the chosen 2:4 mode)", "mode", dict(init="sparsegpt")),
    # compensation (--compensate obs): the chosen mode's cut at the end of its ramp, or every cut
    # of fixed groups on the same ramp, moves the kept weights of the row by OBS
    ("2:4, the chosen 2:4 mode, compensated cut", "mode", dict(compensate="obs")),
    ("2:4, --init wanda, changing masks (the chosen 2:4 mode)", "mode", dict(init="wanda")),
    ("2:4, --init sparsegpt, changing masks, compensated cut", "mode", dict(init="sparsegpt", compensate="obs")),
    ("2:4, fixed groups on the chosen mode's ramp and score, compensated", "mode",
     dict(nm_mode="fixed", compensate="obs")),
]
PHASES = ("lr", "select", "nm", "distill", "grid", "lr24", "lr50", "init24")
# the Fisher score's moment of every AGIP row that does not name one: v_t, as the default was
# when the study ran (issue 37 made v_(t-1) the product's default; the study measured both)
STUDY_MOMENT = "current"
DENSE_TEACHER = "dense-ft"  # a row's teacher: the study's dense fine-tuned model (one dense run, kept)


def run_key(method, overrides, target, seed, lr, steps):
    return f"{method}|{json.dumps(overrides, sort_keys=True)}|r{target:g}|s{seed}|lr{lr:g}|T{steps}"


class Study:
    def __init__(self, args):
        self.args, self.cache = args, EvalCache()
        self.path = os.path.join(args.out, f"study-{args.steps}.json")
        self.common = dict(model=args.model, dataset=args.dataset, steps=args.steps, batch_size=args.batch_size,
                           block_size=args.block_size, eval_max_tokens=args.eval_max_tokens,
                           eval_seq_len=args.eval_seq_len, eval_ood=args.ood, eval_validation=True,
                           progress=not args.quick)
        self.data = {"settings": self.common, "rows": [], "choices": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)
        self.done = {r["key"]: r for r in self.data["rows"]}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2)
        os.replace(tmp, self.path)  # a crash never leaves half a JSON

    def run(self, label, method, overrides, target, seed, lr, phase):
        key = run_key(method, overrides, target, seed, lr, self.args.steps)
        if key in self.done:
            return self.done[key]
        name = f"{len(self.data['rows']) + 1:03d}-{method}-r{int(100 * target)}-s{seed}"
        out = os.path.join(self.args.out, "runs", name)
        config = {**overrides, "teacher": self.dense_teacher(lr)} if overrides.get("teacher") == DENSE_TEACHER \
            else overrides
        if method == "agip":
            # the recorded rows scored by v_t, the default's moment when they ran (the product
            # default is v_(t-1) since issue 37): a row keeps meaning what it measured
            config = {"fisher_moment": STUDY_MOMENT, **config}
        cfg = FinetuneConfig(**{**self.common, "method": method, "target_sparsity": target, "seed": seed, "lr": lr,
                                "out": out, **config})
        t0 = time.time()
        print(f"[{phase}] {label} r={target} seed={seed} lr={lr:g} ...", flush=True)
        rep = finetune(cfg, cache=self.cache)  # the grid shares corpora and the fresh model's figures

        def ppl(x):
            return x["ppl"] if x else None

        row = {"key": key, "phase": phase, "label": label, "method": method, "target": target, "seed": seed,
               "lr": lr, **overrides, "ppl_before": ppl(rep["ppl_before"]), "ppl_test": ppl(rep["ppl_after"]),
               "ppl_pruned": ppl(rep.get("ppl_pruned")), "ppl_validation": ppl(rep["ppl_after_validation"]),
               "ood_before": ppl(rep["ood_before"]), "ood_test": ppl(rep["ood_after"]),
               "ood_validation": ppl(rep["ood_after_validation"]),
               "sparsity_prunable": rep["sparsity_prunable"], "sparsity_all": rep["sparsity_all"],
               "layer_density": rep["layer_density"], "wall_s": time.time() - t0,
               "tokens_per_s": rep["tokens_per_s"], "scored_tokens": rep["ppl_after"]["scored_tokens"],
               "ood_scored_tokens": rep["ood_after"]["scored_tokens"] if rep["ood_after"] else None,
               "seq_len": rep["ppl_after"]["seq_len"], "bf16_products": rep.get("bf16_products"),
               "distill_ce_shared": rep.get("distill_ce_shared"),
               "cpu": cpu_name()}
        self.data["rows"].append(row)
        self.done[key] = row
        self.save()
        if not self.args.keep_checkpoints:  # 0.5 GB each for the embedded model; the report stays
            checkpoint.remove(os.path.join(out, "checkpoint"))
        print(f"    test ppl {row['ppl_test']:.3f}, validation {row['ppl_validation']:.3f}"
              + (f", {self.args.ood} test {row['ood_test']:.3f}" if row["ood_test"] else ""), flush=True)
        return row

    def dense_teacher(self, lr) -> str:
        """The checkpoint of dense fine-tuning (seed 0, this study's budget), kept as a
        teacher: run once (its cost is stated as the 'teacher' row), then reused."""
        out = os.path.join(self.args.out, "teacher-dense")
        path = os.path.join(out, "checkpoint")
        if not checkpoint.is_checkpoint(path):
            t0 = time.time()
            print(f"[teacher] dense fine-tuning, kept as the teacher in {path} ...", flush=True)
            rep = finetune(FinetuneConfig(**{**self.common, "method": "adamw", "target_sparsity": 0.0, "seed": 0,
                                             "lr": lr, "out": out}), cache=self.cache)
            self.data.setdefault("teacher", {})["dense-ft"] = {"path": path, "wall_s": time.time() - t0,
                                                              "ppl_test": rep["ppl_after"]["ppl"],
                                                              "bf16_products": rep.get("bf16_products"), "cpu": cpu_name()}
            self.save()
        return path

    @staticmethod
    def val_score(row):
        """Validation score of a run: geometric mean of in-domain and out-of-domain
        validation perplexity (in domain only when there is no out-of-domain corpus)."""
        vals = [v for v in (row["ppl_validation"], row.get("ood_validation")) if v]
        return math.exp(sum(math.log(v) for v in vals) / len(vals))

    def choose_lr(self):
        rows = {lr: self.run("dense fine-tuning (AdamW)", "adamw", {}, 0.0, 0, lr, "lr") for lr in self.lrs()}
        best = min(rows, key=lambda lr: rows[lr]["ppl_validation"])
        self.data["choices"]["lr"] = best
        self.save()
        return best

    def lrs(self):
        return (self.args.lr,) if self.args.lr else LRS

    def choose_default(self, lr):
        top = max(self.args.targets)
        rows = [(label, ov, self.run(f"AGIP candidate: {label}", "agip", ov, top, 0, lr, "select"))
                for label, ov in CANDIDATES]
        label, ov, _ = min(rows, key=lambda r: self.val_score(r[2]))
        self.data["choices"]["default"] = {"label": label, "overrides": ov}
        self.save()
        return label, ov

    def choose_nm(self, lr, default_overrides):
        rows = [(label, {**default_overrides, **ov},
                 self.run(f"AGIP candidate: {label}", "agip", {**default_overrides, **ov}, 0.5, 0, lr, "nm"))
                for label, ov in NM_CANDIDATES]
        label, ov, _ = min(rows, key=lambda r: self.val_score(r[2]))
        self.data["choices"]["nm"] = {"label": label, "overrides": ov}
        self.save()

    def choose_init(self, lr, default_overrides):
        """Issue 36's 2:4 candidates (INIT_CANDIDATES) beside the chosen 2:4 mode, chosen the
        same way (validation); recorded as the choice ``init24``."""
        nm_choice = self.data["choices"].get("nm")
        if nm_choice is None:
            sys.exit("no 2:4 mode chosen yet: run the 'nm' phase first")
        base = {"default": default_overrides, "mode": nm_choice["overrides"]}
        rows = [(f"AGIP 2:4 ({nm_choice['label']})", nm_choice["overrides"],
                 self.run(f"AGIP 2:4 ({nm_choice['label']})", "agip", nm_choice["overrides"], 0.5, 0, lr, "grid"))]
        for label, on, ov in INIT_CANDIDATES:
            if self.wanted(label, 0):
                full = {**base[on], **ov}
                rows.append((label, full, self.run(f"AGIP candidate: {label}", "agip", full, 0.5, 0, lr, "init24")))
        label, ov, _ = min(rows, key=lambda r: self.val_score(r[2]))
        self.data["choices"]["init24"] = {"label": label, "overrides": ov}
        self.save()

    def choose_distill(self, lr):
        nm_choice = self.data["choices"].get("nm")
        if nm_choice is None:
            sys.exit("no 2:4 mode chosen yet: run the 'nm' phase first")
        rows = [(label, ov, self.run(f"AGIP 2:4 ({nm_choice['label']}), distilled: {label}", "agip",
                                     {**nm_choice["overrides"], **ov}, 0.5, 0, lr, "distill"))
                for label, ov in DISTILL_CANDIDATES]
        base = self.done.get(run_key("agip", nm_choice["overrides"], 0.5, 0, lr, self.args.steps))
        label, ov, best = min(rows, key=lambda r: self.val_score(r[2]))
        if base is not None and self.val_score(base) <= self.val_score(best):
            print(f"distillation: no candidate beats the 2:4 mode without it on validation "
                  f"({self.val_score(best):.3f} vs {self.val_score(base):.3f}); the best one is still recorded")
        self.data["choices"]["distill"] = {"label": label, "overrides": ov}
        self.save()

    def grid(self, lr, default_label, default_overrides):
        targets, top = self.args.targets, max(self.args.targets)
        default = (f"AGIP default ({default_label})", "agip", default_overrides)
        thesis = ("AGIP thesis preset (Taylor |w·g|, exp, TA γ=1)", "agip", {"preset": "thesis"})
        wanda = ("Wanda + FT", "wanda", {})
        dense = ("dense fine-tuning (AdamW)", "adamw", {})
        # the most telling comparisons first, so a study stopped early has them
        runs = [(*dense, 0.0, 0)]
        runs += [(*m, t, 0) for t in sorted(targets, reverse=True) for m in (default, wanda, thesis)]
        # the seeds of the must-show comparison (default vs Wanda + FT vs dense) before the other baselines
        runs += [(*m, 0.0 if m is dense else top, s) for s in (1, 2) for m in (dense, wanda, default)]
        # SparseGPT + FT where llmcompressor is installed (the 'baselines' extra, a virtual
        # environment of its own: it pins transformers); the study can be continued there
        if importlib.util.find_spec("llmcompressor") is not None:
            runs += [("SparseGPT + FT (llmcompressor)", "sparsegpt", {}, t, 0) for t in sorted(targets, reverse=True)]
        else:
            print("SparseGPT + FT: skipped (llmcompressor is not installed: pip install -e '.[baselines]' in a "
                  "virtual environment of its own, then run this script there)", flush=True)
        # the 2:4 pattern (GPU sparse tensor cores) at 50%: what the structure costs against unstructured
        if 0.5 in targets:
            runs.append((f"AGIP default, 2:4 pattern ({default_label})", "agip",
                         {**default_overrides, "sparsity_pattern": "2:4"}, 0.5, 0))
        runs += [(*m, t, 0) for m in (("GMP (cubic, magnitude)", "gmp", {}), ("one-shot magnitude + FT", "magnitude", {}))
                 for t in targets]
        # a smoothed Taylor score, PLATON's first factor (EMA 0.85 of |w·g|), as the default's ramp:
        # is smoothing the thesis' score enough? And PLATON's whole score (I_bar * U_bar, a host-side
        # baseline): is its uncertainty factor worth 8 bytes per weight inside the optimizer?
        if 0.5 in targets:
            runs.append(("AGIP smoothed Taylor (EMA 0.85 of |w·g|, cubic, no TA)", "agip",
                         dict(saliency="taylor", saliency_ema=0.85, schedule="cubic", prune_interval=1, ta_gamma=0.0,
                              stability=False), 0.5, 0))
            runs.append(("PLATON (Ī·Ū, GMP's cubic ramp, masks every step)", "platon", {}, 0.5, 0))
        # seeds 1 and 2 of the default at the lower targets (its target against dense fine-tuning)
        runs += [(*default, t, s) for s in (1, 2) for t in sorted(targets) if t != top]
        # the default scored from the state the previous update wrote, |w_(t-1)|·v_(t-1)^p (the score
        # that lets the update pass histogram the next step's keys): three seeds at the largest target
        # beside the default's three; it becomes the default only if it measures better on validation
        runs += [(f"AGIP default, score of v_(t-1) ({default_label})", "agip",
                  {**default_overrides, "fisher_moment": "previous"}, top, s) for s in (0, 1, 2)]
        # 2:4 at 50%: the one-shot baselines + FT (the masks the literature compares with), and
        # the chosen AGIP 2:4 mode's seeds
        runs += [(f"{name}, 2:4", method, {"sparsity_pattern": "2:4"}, 0.5, 0)
                 for name, method in (("Wanda + FT", "wanda"), ("one-shot magnitude + FT", "magnitude"))]
        if importlib.util.find_spec("llmcompressor") is not None:
            runs.append(("SparseGPT + FT (llmcompressor), 2:4", "sparsegpt", {"sparsity_pattern": "2:4"}, 0.5, 0))
        nm_choice, dist = self.data["choices"].get("nm"), self.data["choices"].get("distill")
        if nm_choice and 0.5 in targets:
            # seed 0 is the nm phase's run at this budget (the same key: not run twice)
            runs += [(f"AGIP 2:4 ({nm_choice['label']})", "agip", nm_choice["overrides"], 0.5, s) for s in (0, 1, 2)]
        # the chosen distillation for the 2:4 baselines and the unstructured default at 50% (the
        # same teacher, terms and helper), and for the 2:4 mode with the dense fine-tuned teacher
        if dist and 0.5 in targets:
            tag = f"distilled: {dist['label']}"
            runs += [(f"Wanda + FT, 2:4, {tag}", "wanda", {"sparsity_pattern": "2:4", **dist["overrides"]}, 0.5, 0),
                     (f"{default[0]}, {tag}", "agip", {**default_overrides, **dist["overrides"]}, 0.5, 0),
                     (f"one-shot magnitude + FT, 2:4, {tag}", "magnitude", {"sparsity_pattern": "2:4",
                                                                           **dist["overrides"]}, 0.5, 0)]
            if nm_choice:
                # the start teacher too: the distill phase's run when the 2:4 mode was chosen before
                # it (the same key, not run twice); a new run when a later candidate won the nm phase
                taught_nm = {**nm_choice["overrides"], **dist["overrides"]}
                runs += [(f"AGIP 2:4 ({nm_choice['label']}), {tag}", "agip", taught_nm, 0.5, 0),
                         (f"AGIP 2:4 ({nm_choice['label']}), {tag}, teacher: dense fine-tuned", "agip",
                          {**taught_nm, "teacher": DENSE_TEACHER}, 0.5, 0)]
        # the strongest baselines' seeds: SparseGPT + FT in 2:4, PLATON at 50% (unstructured)
        if 0.5 in targets:
            if importlib.util.find_spec("llmcompressor") is not None:
                runs += [("SparseGPT + FT (llmcompressor), 2:4", "sparsegpt", {"sparsity_pattern": "2:4"}, 0.5, s)
                         for s in (1, 2)]
            runs += [("PLATON (Ī·Ū, GMP's cubic ramp, masks every step)", "platon", {}, 0.5, s) for s in (1, 2)]
        # the other baselines with the same distillation (2:4 and 50%): the same helper for every method
        if dist and 0.5 in targets:
            taught = [("Wanda + FT", "wanda"), ("PLATON (Ī·Ū, GMP's cubic ramp, masks every step)", "platon"),
                      ("one-shot magnitude + FT", "magnitude"), ("GMP (cubic, magnitude)", "gmp")]
            if importlib.util.find_spec("llmcompressor") is not None:
                runs.append((f"SparseGPT + FT (llmcompressor), 2:4, {tag}", "sparsegpt",
                             {"sparsity_pattern": "2:4", **dist["overrides"]}, 0.5, 0))
                taught.insert(1, ("SparseGPT + FT (llmcompressor)", "sparsegpt"))
            runs += [(f"{name}, {tag}", method, dict(dist["overrides"]), 0.5, 0) for name, method in taught]
        for label, method, ov, target, seed in runs:
            if self.wanted(label, seed):
                self.run(label, method, ov, target, seed, lr, "grid")

    def wanted(self, label, seed) -> bool:
        """Whether ``--only`` and ``--seeds`` let a grid (or lr24) row run."""
        a = self.args
        return (not a.only or any(label == o if a.exact else label.startswith(o) for o in a.only)) and \
            (a.seeds is None or seed in a.seeds)

    def nm_lrs(self, lr):
        """The lr24 phase: the 2:4 rows of the grid (the chosen mode, Wanda + FT, SparseGPT + FT
        where llmcompressor is installed) at each lr of LRS_24, seed 0; their rows at the
        study's lr are the grid's (the same key: not run twice)."""
        rows = [("Wanda + FT, 2:4", "wanda", {"sparsity_pattern": "2:4"})]
        nm_choice = self.data["choices"].get("nm")
        if nm_choice:
            rows.insert(0, (f"AGIP 2:4 ({nm_choice['label']})", "agip", nm_choice["overrides"]))
        if importlib.util.find_spec("llmcompressor") is not None:
            rows.append(("SparseGPT + FT (llmcompressor), 2:4", "sparsegpt", {"sparsity_pattern": "2:4"}))
        self.run_lrs(rows, lr, "lr24")

    def flat_lrs(self, lr, default_label, default_overrides):
        """The lr50 phase: the unstructured rows at 50% that lead the grid (the default, Wanda
        + FT, PLATON, SparseGPT + FT where llmcompressor is installed) at each lr of LRS_24,
        seed 0, as the lr24 phase does for 2:4: is the study's lr, dense fine-tuning's, too
        small for a pruned model?"""
        rows = [(f"AGIP default ({default_label})", "agip", default_overrides), ("Wanda + FT", "wanda", {}),
                ("PLATON (Ī·Ū, GMP's cubic ramp, masks every step)", "platon", {})]
        if importlib.util.find_spec("llmcompressor") is not None:
            rows.append(("SparseGPT + FT (llmcompressor)", "sparsegpt", {}))
        self.run_lrs(rows, lr, "lr50")

    def run_lrs(self, rows, lr, phase):
        """Each of ``rows`` (label, method, overrides) at 50%, seed 0, at the study's lr (the
        grid's run: the same key, not run twice) and at each lr of LRS_24 (phase ``phase``)."""
        for label, method, ov in rows:
            if self.wanted(label, 0):
                for x in sorted({lr, *LRS_24}):
                    self.run(label, method, ov, 0.5, 0, x, "grid" if x == lr else phase)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wiki-mini")
    ap.add_argument("--ood", default="pydoc", help="out-of-domain evaluation corpus ('' for none)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="skip the lr phase and use this lr")
    ap.add_argument("--eval-max-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=None)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--phase", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 steps, short evaluations: checks the pipeline only")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the JSON")
    ap.add_argument("--only", nargs="+", default=None, help="run only the grid rows whose label starts with one of these")
    ap.add_argument("--exact", action="store_true", help="--only's labels must match whole labels")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="run only the grid rows of these seeds")
    ap.add_argument("--default-from", default=None,
                    help="a study JSON whose choices (lr, default, 2:4 mode, distillation) to use, e.g. study-100.json "
                         "for a 400-step grid")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_max_tokens = 2, min(args.eval_max_tokens, 512)
    args.ood = args.ood or None
    os.makedirs(args.out, exist_ok=True)
    study = Study(args)
    if args.default_from:  # take another budget's choices instead of running lr and select here
        with open(args.default_from) as f:
            chosen = json.load(f)["choices"]
        # they replace this study's copies: a choice made there later (a 2:4 mode chosen after
        # this grid first ran) is the one this grid runs; rows recorded keep their labels
        study.data["choices"]["lr"] = args.lr or chosen["lr"]
        for what in ("default", "nm", "distill"):
            if what in chosen:
                study.data["choices"][what] = chosen[what]
    if not args.report_only:
        lr = study.data["choices"].get("lr") or (study.choose_lr() if "lr" in args.phase else None)
        if lr is None:
            sys.exit("no lr chosen yet: run the 'lr' phase first, or pass --lr")
        chosen = study.data["choices"].get("default")
        if chosen is None and "select" in args.phase:
            label, ov = study.choose_default(lr)
        elif chosen is not None:
            label, ov = chosen["label"], chosen["overrides"]
        if "nm" in args.phase or "grid" in args.phase:
            if chosen is None and "select" not in args.phase:
                sys.exit("no default chosen yet: run the 'select' phase first")
        if "nm" in args.phase and 0.5 in args.targets:
            study.choose_nm(lr, ov)
        if "distill" in args.phase and 0.5 in args.targets:
            study.choose_distill(lr)
        if "grid" in args.phase:
            study.grid(lr, label, ov)
        if "lr24" in args.phase and 0.5 in args.targets:
            study.nm_lrs(lr)
        if "lr50" in args.phase and 0.5 in args.targets:
            study.flat_lrs(lr, label, ov)
        if "init24" in args.phase and 0.5 in args.targets:
            study.choose_init(lr, ov)
    write_outputs(study.data, args.out, args.steps)


def write_outputs(data, out, steps):
    """``study-<steps>.md`` (tables) and ``study-<steps>.png`` (perplexity against sparsity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = data["rows"], data["settings"]
    if not rows:
        print("no runs recorded yet")
        return
    r0 = rows[0]
    ood = s.get("eval_ood")
    lines = [
        f"{s['steps']} steps × {s['batch_size']}×{s['block_size']} tokens for every method, linear warm-up and "
        f"decay; test perplexity on the first {s['eval_max_tokens']:,} tokens of the test split "
        f"({r0['scored_tokens']:,} scored, L={r0['seq_len']}, non-overlapping windows)"
        + (f"; out of domain: {ood} test split ({r0['ood_scored_tokens']:,} scored tokens)" if ood else "")
        + f". Dense model before fine-tuning: {r0['ppl_before']:.3f}" + (f" ({ood}: {r0['ood_before']:.3f})" if ood else "")
        + ".",
        "",
        f"Chosen on validation: lr {data['choices'].get('lr', '(not yet)')}; default "
        f"{data['choices'].get('default', {}).get('label', '(not yet)')}.",
        "",
        "| phase | method | target | seed | lr | test ppl | " + (f"{ood} test ppl | " if ood else "")
        + "valid. ppl | " + (f"{ood} valid. ppl | " if ood else "")
        + "after one-shot pruning | sparsity prunable / all | wall s | tokens/s |",
        "|---|---|---|---|---|---|" + ("---|" if ood else "") + "---|" + ("---|" if ood else "") + "---|---|---|---|",
    ]
    order = {p: i for i, p in enumerate(PHASES)}
    for r in sorted(rows, key=lambda r: (order.get(r["phase"], 9), r["target"], r["label"], r["seed"], r["lr"])):
        def f(x):
            return f"{x:.3f}" if x else ""
        lines.append(f"| {r['phase']} | {md(r['label'])} | {r['target']:.1f} | {r['seed']} | {r['lr']:g} | "
                     f"{f(r['ppl_test'])} | " + (f"{f(r['ood_test'])} | " if ood else "")
                     + f"{f(r['ppl_validation'])} | " + (f"{f(r['ood_validation'])} | " if ood else "")
                     + f"{f(r['ppl_pruned'])} | {100 * r['sparsity_prunable']:.1f}% / {100 * r['sparsity_all']:.1f}% | "
                     f"{r['wall_s']:.0f} | {r['tokens_per_s']:.0f} |")
    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    # means over seeds of the grid rows (with the lr and select runs that are grid runs too;
    # grid_label keeps only runs at the chosen lr, so label and target make a group)
    groups = {}
    for r in rows:
        label = grid_label(r, data)
        if label:
            groups.setdefault((label, r["target"]), []).append(r)
    lines += ["", "Grid means over seeds:", "", "| method | target | seeds | mean test ppl | "
              + (f"mean {ood} test ppl |" if ood else ""), "|---|---|---|---|" + ("---|" if ood else "")]
    for (label, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {md(label)} | {target:.1f} | {len(rs)} | {mean(rs, 'ppl_test'):.3f} | "
                     + (f"{mean(rs, 'ood_test'):.3f} |" if ood else ""))
    lines += lr_tables(data, ood)
    with open(os.path.join(out, f"study-{steps}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    keys = [("ppl_test", "wiki-mini test")] + ([("ood_test", f"{ood} test (out of domain)")] if ood else [])
    dense = [r for r in rows if r["method"] == "adamw" and r["lr"] == data["choices"].get("lr")]
    by_label = {}  # the grid groups above, dense fine-tuning apart: label -> target -> runs
    for (label, target), rs in groups.items():
        if rs[0]["method"] != "adamw":
            by_label.setdefault(label, {})[target] = rs
    # perplexity against sparsity: the unstructured methods without a teacher (the 2:4 and the
    # distilled rows are points at one target: the bar chart below shows them)
    lines_of = {lb: pts for lb, pts in by_label.items() if "2:4" not in lb and "distilled" not in lb}
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys) + 3, 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        if dense:
            ax.axhline(mean(dense, key), color="black", ls="--", label="dense fine-tuning")
        for i, (label, pts) in enumerate(lines_of.items()):
            xs = sorted(pts)
            ax.plot([100 * x for x in xs], [mean(pts[x], key) for x in xs], "o-", label=label,
                    color=plt.cm.tab20(i % 20))
        ax.set_xlabel("sparsity of the prunable weights (%)")
        ax.set_ylabel("perplexity (mean over seeds)")
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"study-{steps}.png"), dpi=110)
    plt.close(fig)
    # every method at the largest target, unstructured and 2:4, with and without a teacher
    top = max((t for pts in by_label.values() for t in pts), default=None)
    bars = sorted(((lb, pts[top]) for lb, pts in by_label.items() if top in pts), key=lambda kv: mean(kv[1], "ppl_test"))
    if bars:
        fig, ax = plt.subplots(figsize=(13, 0.32 * len(bars) + 1.5))
        height = 0.8 / len(keys)
        for j, (key, title) in enumerate(keys):
            ys = [i + j * height for i in range(len(bars))]
            ax.barh(ys, [mean(rs, key) for _, rs in bars], height=height, label=title)
            if dense:
                ax.axvline(mean(dense, key), color=f"C{j}", ls="--", lw=1,
                           label=f"dense fine-tuning ({title})")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(bars))],
                      [f"{lb} ({len(rs)} seed{'s' if len(rs) > 1 else ''})" for lb, rs in bars],
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(f"perplexity at {100 * top:.0f}% of the prunable weights (mean over seeds; lower is better)")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"study-{steps}-bars.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
    write_density(data, out, steps, plt)
    print("\n".join(lines))
    print(f"wrote {out}/study-{steps}.json, .md, .png")


def lr_tables(data, ood) -> list:
    """The lr24 and lr50 phases' tables (:func:`lr_lines`)."""
    return (lr_lines(data, ood, "lr24", "2:4 at 50%, seed 0: each method at every lr measured (the lr24 phase")
            + lr_lines(data, ood, "lr50", "Unstructured 50%, seed 0: each method at every lr measured (the lr50 "
                                          "phase"))


def lr_lines(data, ood, phase, title) -> list:
    """A phase's lr table: each of its methods at 50% (seed 0) at every lr measured, the one
    with the best validation score (Study.val_score) marked; [] before the phase has run."""
    labels = {r["label"] for r in data["rows"] if r["phase"] == phase}
    by = {}
    for r in data["rows"]:
        label = r["label"] if r["phase"] == phase else grid_label(r, data)
        if label in labels and r["seed"] == 0 and r["target"] == 0.5:
            by.setdefault(label, {})[r["lr"]] = r
    if not by:
        return []
    lines = ["", title + "; * = best on validation, the geometric mean of wiki-mini's"
             + (f" and {ood}'s" if ood else "") + " validation perplexity):", "",
             "| method | lr | valid. ppl | " + (f"{ood} valid. ppl | " if ood else "") + "valid. score | test ppl | "
             + (f"{ood} test ppl |" if ood else ""), "|---|---|---|---|---|" + ("---|---|" if ood else "")]
    for label in sorted(by):
        best = min(by[label], key=lambda lr: Study.val_score(by[label][lr]))
        for lr in sorted(by[label]):
            r = by[label][lr]
            lines.append(f"| {md(label)} | {lr:g}{' *' if lr == best else ''} | {r['ppl_validation']:.3f} | "
                         + (f"{r['ood_validation']:.3f} | " if ood else "") + f"{Study.val_score(r):.3f} | "
                         f"{r['ppl_test']:.3f} | " + (f"{r['ood_test']:.3f} |" if ood else ""))
    return lines


def md(text: str) -> str:
    return text.replace("|", "\\|")  # a label's pipes must not split a table cell


def run_overrides(r) -> dict:
    """The overrides a run was made with, read back from its key (``run_key``'s JSON part)."""
    _, rest = r["key"].split("|", 1)
    return json.loads(rest.rsplit("|", 4)[0])


def is_default(r, data) -> bool:
    # the same overrides exactly: a distilled default, or one with another score, is a row of its own
    chosen = data["choices"].get("default")
    return chosen is not None and r["method"] == "agip" and run_overrides(r) == chosen["overrides"]


def grid_label(r, data):
    """The grid label of a run at the chosen lr (the chosen default's select run counts as
    the default's, the chosen 2:4 mode's nm run as that mode's), or None for runs outside the grid."""
    if r["lr"] != data["choices"].get("lr"):
        return None
    if is_default(r, data):
        return f"AGIP default ({data['choices']['default']['label']})"
    nm_choice = data["choices"].get("nm")
    if nm_choice and r["method"] == "agip" and run_overrides(r) == nm_choice["overrides"]:
        return f"AGIP 2:4 ({nm_choice['label']})"
    if r["phase"] == "grid" or r["method"] == "adamw":
        return r["label"]
    return None


def write_density(data, out, steps, plt):
    """``study-<steps>-density.png``: per-layer density of the chosen default next to the
    thesis preset at the largest target (seed 0), when both runs are recorded."""
    from agip.report import density_grid

    chosen = data["choices"].get("default")
    if chosen is None:
        return
    top = max(r["target"] for r in data["rows"])
    pick = {}
    for r in data["rows"]:
        if r["method"] != "agip" or r["seed"] != 0 or r["target"] != top or r["lr"] != data["choices"].get("lr"):
            continue
        if r.get("preset") == "thesis":
            pick["thesis"] = r
        elif is_default(r, data):
            pick["default"] = r
    if len(pick) < 2:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 7), sharey=True)
    for ax, kind in zip(axes, ("default", "thesis")):
        r = pick[kind]
        blocks, kinds, grid = density_grid(r["layer_density"])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
        ax.set_yticks(range(len(blocks)), blocks)
        ax.set_title(f"{r['label']}\n{100 * r['sparsity_prunable']:.0f}% pruned", fontsize=8)
    axes[0].set_ylabel("block")
    fig.colorbar(im, ax=axes, label="share of weights kept")
    fig.savefig(os.path.join(out, f"study-{steps}-density.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
