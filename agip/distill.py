"""Distillation from a frozen teacher, a loss beside any pruning method (docs/algorithm.md §7).

The student's loss becomes

    L = w_ce · CE + w_kl · T² · KL(p_teacher^T ‖ p_student^T) + w_hidden · SquareHead

- KL over the vocabulary at every position, p^T = softmax(logits / T), averaged over tokens
  (Hinton et al. 2015; the T² keeps the gradient's scale independent of T);
- SquareHead (Kurtic et al. 2023): for each transformer block l, the MSE between the
  student's and the teacher's hidden states divided by the teacher's mean square, averaged
  over the blocks (the embeddings' output is left out).

The vocabulary-wide KL is the costly part (49,152 logits a token for SmolLM2): :func:`kl_div`
works through chunks of tokens in fp32 and writes its gradient, ``T · (q − p) / n``, into one
buffer in the logits' dtype during the forward pass (Liger-Kernel's habit for fused losses),
so the extra memory is one logits-sized buffer plus one chunk's fp32 temporaries, never
several full-vocabulary fp32 copies.

    teacher = agip.distill.load_teacher("start", model)      # or a folder, e.g. a dense fine-tuned model
    loss_fn = agip.distill.DistillLoss(teacher, ce=1.0, kl=1.0, hidden=1.0)
    loss = loss_fn(model, input_ids)                          # loss_fn.last: each term, as floats
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import number


class _ChunkedKL(torch.autograd.Function):
    """T² · mean over tokens of KL(softmax(t/T) ‖ softmax(s/T)), its gradient made in forward."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float, chunk: int):
        s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        n = s.shape[0]
        grad = torch.empty_like(s)  # the logits' dtype (bf16 under autocast): one buffer
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, n, chunk):
            ls = torch.log_softmax(s[i : i + chunk].float() / temperature, dim=-1)
            lt = torch.log_softmax(t[i : i + chunk].float() / temperature, dim=-1)
            pt = lt.exp()
            total += lt.sub_(ls).mul_(pt).sum()  # in place: each chunk makes 3 fp32 temporaries, not 7
            # d/ds of T² KL(p ‖ softmax(s/T)) is T (q - p); the mean over n tokens divides by n
            grad[i : i + chunk] = ls.exp_().sub_(pt).mul_(temperature / n)
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return total * (temperature * temperature / n)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)).view(ctx.shape), None, None, None


def default_chunk_tokens(device) -> int:
    """Tokens per chunk of :func:`kl_div`: on the CPU a chunk's fp32 rows must stay in cache
    (32 tokens × 49,152 logits × 4 B = 6 MB; 1,024 tokens took 3-4x as long on SmolLM2's
    logits, the gradient bit-identical), on a GPU larger chunks keep the kernels busy and
    the launches few (1,024 tokens: 200 MB of fp32 temporaries at SmolLM2's vocabulary)."""
    return 1024 if torch.device(device).type == "cuda" else 32


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """T² · KL(p_teacher^T ‖ p_student^T) averaged over tokens (algorithm.md §7), in chunks of
    ``chunk_tokens`` tokens (None: :func:`default_chunk_tokens` of the logits' device);
    differentiable in ``student_logits`` only. The gradient does not depend on the chunk size;
    the loss's value does, in its last bits (summation order)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kl_div: the student's logits {tuple(student_logits.shape)} and the teacher's "
                         f"{tuple(teacher_logits.shape)} differ: the teacher needs the student's vocabulary "
                         "(the same tokenizer) and the same input")
    if not (number(temperature) and temperature > 0):
        raise ValueError(f"kl_div: temperature must be > 0, got {temperature!r}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(student_logits.device)
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"kl_div: chunk_tokens must be an int >= 1 or None, got {chunk_tokens!r}")
    return _ChunkedKL.apply(student_logits, teacher_logits.detach(), float(temperature), chunk_tokens)


def squarehead(student_hidden, teacher_hidden) -> torch.Tensor:
    """SquareHead (algorithm.md §7): mean over blocks l of MSE(h_s^l, h_t^l) / mean(h_t^l²);
    ``*_hidden`` are ``output_hidden_states`` tuples (the first entry, the embeddings' output,
    is left out)."""
    if len(student_hidden) != len(teacher_hidden) or len(student_hidden) < 2:
        raise ValueError(f"squarehead: the student has {len(student_hidden)} hidden states and the teacher "
                         f"{len(teacher_hidden)}: SquareHead needs a teacher of the student's depth")
    terms = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:]):
        ht = ht.detach().float()
        terms.append((hs.float() - ht).pow(2).mean() / ht.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


@dataclass
class DistillLoss:
    """The distillation loss of a student (algorithm.md §7): call it with the model and the
    token ids (labels are the inputs, shifted inside the model, as in ``agip finetune``).
    ``last`` holds the terms of the last call as floats (``ce``, ``kl``, ``hidden``, ``loss``)."""

    teacher: torch.nn.Module
    ce: float = 1.0
    kl: float = 0.0
    temperature: float = 1.0
    hidden: float = 0.0
    chunk_tokens: Optional[int] = None  # None: kl_div's default for the logits' device
    last: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("ce", "kl", "hidden"):
            w = getattr(self, name)
            if not (number(w) and w >= 0):
                raise ValueError(f"DistillLoss: the weight {name} must be a number >= 0, got {w!r}")
        if self.ce + self.kl + self.hidden == 0:
            raise ValueError("DistillLoss: every weight is 0 (ce, kl, hidden): nothing to train on")
        if not (number(self.temperature) and self.temperature > 0):
            raise ValueError(f"DistillLoss: temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.teacher, torch.nn.Module):
            raise TypeError(f"DistillLoss: teacher must be a torch.nn.Module, got {type(self.teacher).__name__}")
        self.teacher.eval().requires_grad_(False)

    def terms(self, student_out, teacher_out) -> dict:
        """The weighted terms from the student's output (with ``loss`` when CE is on) and the
        teacher's (both with ``hidden_states`` when SquareHead is on)."""
        out = {}
        if self.ce > 0:
            out["ce"] = student_out.loss
        if self.kl > 0:
            out["kl"] = kl_div(student_out.logits, teacher_out.logits, self.temperature, self.chunk_tokens)
        if self.hidden > 0:
            out["hidden"] = squarehead(student_out.hidden_states, teacher_out.hidden_states)
        return out

    def total(self, terms: dict) -> torch.Tensor:
        loss = sum(getattr(self, k) * v for k, v in terms.items())
        self.last = {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach())}
        return loss

    def teacher_out(self, input_ids, **kw):
        with torch.no_grad():
            return self.teacher(input_ids, output_hidden_states=self.hidden > 0, **kw)

    def __call__(self, model, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        labels = input_ids if labels is None else labels
        student = model(input_ids, labels=labels if self.ce > 0 else None, output_hidden_states=self.hidden > 0)
        return self.total(self.terms(student, self.teacher_out(input_ids)))


def load_teacher(spec, start_model: Optional[torch.nn.Module] = None, dtype: torch.dtype = torch.bfloat16,
                 device=None) -> torch.nn.Module:
    """The frozen teacher: ``"start"`` is a copy of ``start_model`` (the model before pruning
    and fine-tuning); anything else is a model folder or hub name for transformers'
    ``AutoModelForCausalLM.from_pretrained`` (e.g. the checkpoint of a dense run, ``agip
    finetune --method adamw``: OUT/checkpoint). In ``dtype`` (bf16 by default: the teacher
    only runs forward), in eval mode, without gradients. A module given as ``spec`` is taken
    as it is (moved to ``dtype``)."""
    if isinstance(spec, torch.nn.Module):
        teacher = spec
    elif not isinstance(spec, str) or not spec:
        raise ValueError(f"teacher must be 'start', a model folder or a module, got {spec!r}")
    elif spec == "start":
        if start_model is None:
            raise ValueError("teacher 'start' needs the starting model (start_model=...)")
        teacher = copy.deepcopy(start_model)
    else:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    teacher = teacher.to(dtype=dtype, device=device if device is not None else next(teacher.parameters()).device)
    return teacher.eval().requires_grad_(False)


def check_teacher(teacher, student) -> None:
    """The teacher must share the student's vocabulary (KL compares their distributions)."""
    vs, vt = (getattr(getattr(m, "config", None), "vocab_size", None) for m in (student, teacher))
    if vs is not None and vt is not None and vs != vt:
        raise ValueError(f"the teacher's vocabulary has {vt} tokens and the student's {vs}: distill from a model "
                         "with the student's tokenizer")
