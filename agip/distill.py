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
several full-vocabulary fp32 copies. With both CE and KL on, :func:`ce_kl` takes the CE from
the same chunks (the model is then called without labels: its own loss would make a
full-vocabulary fp32 copy of the logits and a second softmax): on the CPU that made a
distilled step 1.09× a step without a teacher instead of 1.50× (docs/study.md, "Distillation's cost").

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


IGNORE_INDEX = -100  # a label that has no cross-entropy term (transformers' convention)


class _ChunkedCEKL(torch.autograd.Function):
    """w_ce · CE(next token) + w_kl · T² · mean over tokens of KL(softmax(t/T) ‖ softmax(s/T)),
    in one pass over the logits in chunks of tokens, the gradient made in forward. Returns
    that sum (differentiable) and, not differentiable, the CE and the T² · KL; ``targets``
    None: no CE (then the gradient is the KL's, T (q − p) / n, computed as it always was)."""

    @staticmethod
    def forward(ctx, student, teacher, targets, temperature: float, w_ce: float, w_kl: float, chunk: int):
        s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        n = s.shape[0]
        grad = torch.empty_like(s)  # the logits' dtype (bf16 under autocast): one buffer
        kl = torch.zeros((), dtype=torch.float32, device=s.device)
        ce = torch.zeros((), dtype=torch.float32, device=s.device)
        valid = None if targets is None else targets.reshape(-1) != IGNORE_INDEX
        n_ce = 0 if valid is None else int(valid.sum())
        a = w_kl * temperature / n  # d/ds of w_kl T² KL(p ‖ softmax(s/T)) / n is w_kl T (q − p) / n
        b = w_ce / n_ce if n_ce else 0.0  # d/ds of w_ce CE / n_ce is w_ce (softmax(s) − onehot) / n_ce
        for i in range(0, n, chunk):
            sc = s[i : i + chunk].float()
            ls = torch.log_softmax(sc / temperature, dim=-1)
            if b:  # CE from the same chunk: the student's log-softmax shared at T = 1
                v = valid[i : i + chunk]
                rows = v.nonzero().squeeze(1)
                cols = targets.reshape(-1)[i : i + chunk][rows]
                ls1 = ls if temperature == 1 else torch.log_softmax(sc, dim=-1)
                ce -= ls1[rows, cols].sum()
            lt = torch.log_softmax(t[i : i + chunk].float() / temperature, dim=-1)
            pt = lt.exp()
            kl += lt.sub_(ls).mul_(pt).sum()  # in place: each chunk makes 3 fp32 temporaries, not 7
            q = ls.exp_()
            if b:
                q1 = q if temperature == 1 else ls1.exp_()
                g = torch.sub(q, pt).mul_(a).addcmul_(q1, v.unsqueeze(1).to(q1.dtype), value=b)
                g[rows, cols] -= b
            else:
                g = q.sub_(pt).mul_(a)
            grad[i : i + chunk] = g
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        kl = kl * (temperature * temperature / n)
        ce = ce / max(n_ce, 1)
        total = kl * w_kl + ce * w_ce if b else kl * w_kl
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    def backward(ctx, grad_out, _ce, _kl):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)).view(ctx.shape), None, None, None, None, None, None


def default_chunk_tokens(device) -> int:
    """Tokens per chunk of :func:`kl_div`: on the CPU a chunk's fp32 rows must stay in cache
    (32 tokens × 49,152 logits × 4 B = 6 MB; 1,024 tokens took 3-4x as long on SmolLM2's
    logits, the gradient bit-identical), on a GPU larger chunks keep the kernels busy and
    the launches few (1,024 tokens: 200 MB of fp32 temporaries at SmolLM2's vocabulary)."""
    return 1024 if torch.device(device).type == "cuda" else 32


def check_logits(fn: str, student_logits, teacher_logits, temperature, chunk_tokens) -> None:
    """Refuses, naming ``fn``, logits of different shapes, a temperature <= 0 and a bad chunk size."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{fn}: the student's logits {tuple(student_logits.shape)} and the teacher's "
                         f"{tuple(teacher_logits.shape)} differ: the teacher needs the student's vocabulary "
                         "(the same tokenizer) and the same input")
    if not (number(temperature) and temperature > 0):
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature!r}")
    if not (chunk_tokens is None or (isinstance(chunk_tokens, int) and chunk_tokens >= 1)):
        raise ValueError(f"{fn}: chunk_tokens must be an int >= 1 or None, got {chunk_tokens!r}")


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """T² · KL(p_teacher^T ‖ p_student^T) averaged over tokens (algorithm.md §7), in chunks of
    ``chunk_tokens`` tokens (None: :func:`default_chunk_tokens` of the logits' device);
    differentiable in ``student_logits`` only. The gradient does not depend on the chunk size;
    the loss's value does, in its last bits (summation order)."""
    check_logits("kl_div", student_logits, teacher_logits, temperature, chunk_tokens)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(student_logits.device)
    return _ChunkedCEKL.apply(student_logits, teacher_logits.detach(), None, float(temperature), 0.0, 1.0,
                              chunk_tokens)[0]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of every position for a causal LM's cross-entropy: the next position's
    label, ``IGNORE_INDEX`` at the last (transformers' shift inside the model's own loss)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return targets


def ce_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
          ce: float = 1.0, kl: float = 1.0, chunk_tokens: Optional[int] = None):
    """``ce`` · CE + ``kl`` · T² · KL (algorithm.md §7) in one chunked pass over the logits:
    returns (the weighted sum, differentiable in ``student_logits``; CE; T² · KL, both
    detached). CE is the model's own next-token loss, from ``labels`` (B, L) shifted by one
    (``IGNORE_INDEX`` entries and the last position have none), averaged over the tokens that
    have one; the KL is :func:`kl_div`'s. At T = 1 the student's log-softmax is shared, and no
    full-vocabulary fp32 copy of the logits is made (the model's own loss upcasts them all):
    call the model without labels."""
    if not (number(ce) and ce > 0 and number(kl) and kl >= 0):
        raise ValueError(f"ce_kl: the weights need ce > 0 and kl >= 0, got ce={ce!r}, kl={kl!r}")
    check_logits("ce_kl", student_logits, teacher_logits, temperature, chunk_tokens)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"ce_kl: labels {tuple(labels.shape)} must have the logits' shape without the vocabulary, "
                         f"{tuple(student_logits.shape[:-1])}")
    targets = next_token_targets(labels)
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError("ce_kl: no position has a next-token label (sequences of one token, or every label "
                         f"{IGNORE_INDEX}): the cross-entropy is undefined")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(student_logits.device)
    total, ce_v, kl_v = _ChunkedCEKL.apply(student_logits, teacher_logits.detach(), targets, float(temperature),
                                           float(ce), float(kl), chunk_tokens)
    return total, ce_v, kl_v


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
    token ids (labels are the inputs, shifted by one as in the model's own loss, as in ``agip
    finetune``). ``last`` holds the terms of the last call as floats (``ce``, ``kl``,
    ``hidden``, ``loss``)."""

    teacher: torch.nn.Module
    ce: float = 1.0
    kl: float = 0.0
    temperature: float = 1.0
    hidden: float = 0.0
    chunk_tokens: Optional[int] = None  # None: kl_div's default for the logits' device
    # CE and KL in one chunked pass (ce_kl) when both are on; False: the model's own CE beside
    # kl_div, as every distilled row recorded before this option was (the same terms, other roundings)
    fuse_ce: bool = True
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

    def loss(self, student_out, teacher_out, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weighted loss from the student's output and the teacher's (both with
        ``hidden_states`` when SquareHead is on); ``last`` gets each term as a float. With
        ``labels`` (the model's own loss' labels) and ``fuse_ce``, CE and KL come from one
        chunked pass over the logits (:func:`ce_kl`; call the model without labels); else CE
        is ``student_out.loss`` (call the model with labels)."""
        terms, parts = {}, []
        if labels is not None and self.fuses:
            total, terms["ce"], terms["kl"] = ce_kl(student_out.logits, teacher_out.logits, labels, self.temperature,
                                                    self.ce, self.kl, self.chunk_tokens)
            parts.append(total)
        else:
            if self.ce > 0:
                if student_out.loss is None:
                    raise ValueError("DistillLoss.loss: the student's output has no loss for the CE term: call the "
                                     "model with labels, or pass labels= here (fuse_ce=True)")
                terms["ce"] = student_out.loss
                parts.append(self.ce * terms["ce"])
            if self.kl > 0:
                terms["kl"] = kl_div(student_out.logits, teacher_out.logits, self.temperature, self.chunk_tokens)
                parts.append(self.kl * terms["kl"])
        if self.hidden > 0:
            terms["hidden"] = squarehead(student_out.hidden_states, teacher_out.hidden_states)
            parts.append(self.hidden * terms["hidden"])
        loss = sum(parts)
        self.last = {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach())}
        return loss

    @property
    def fuses(self) -> bool:
        """Whether CE and KL are computed in one pass (both on, and ``fuse_ce``)."""
        return self.fuse_ce and self.ce > 0 and self.kl > 0

    def teacher_out(self, input_ids, **kw):
        with torch.no_grad():
            return self.teacher(input_ids, output_hidden_states=self.hidden > 0, **kw)

    def __call__(self, model, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        labels = input_ids if labels is None else labels
        own_ce = self.ce > 0 and not self.fuses  # fused: the model skips its own loss, ce_kl computes CE
        student = model(input_ids, labels=labels if own_ce else None, output_hidden_states=self.hidden > 0)
        return self.loss(student, self.teacher_out(input_ids), labels if self.fuses else None)


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
