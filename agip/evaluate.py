"""Perplexity by docs/design.md's protocol (the Hugging Face perplexity guide, SparseGPT/Wanda):
join a split's documents with blank lines, tokenize once, score windows of L tokens.

With ``stride == L`` (the default) the windows do not overlap: every token is scored
except the first of each window, which has no context inside it; the trailing partial
window is scored too. With ``stride < L`` (sliding windows) each window re-reads L -
stride tokens of context and scores only its new tokens. PPL = exp(total NLL / scored
tokens). Every result states L, the stride and the token counts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def windows(n_tokens: int, seq_len: int, stride: int):
    """(begin, end, n_scored) per window: positions [end - n_scored, end) are scored."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        new = end - prev_end  # tokens not scored by an earlier window
        scored = min(new, end - begin - 1)  # a token needs at least one token of context
        if scored > 0:
            yield begin, end, scored
        prev_end = end
        if end == n_tokens:
            break


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, stride: Optional[int] = None, progress: bool = False,
               desc: str = "perplexity", rank: int = 0, world: int = 1) -> dict:
    """Perplexity of ``model`` on the 1-D token tensor ``ids`` (see module docstring).

    With ``world`` > 1 processes (torchrun; every rank calls this), rank r scores windows
    r, r + world, ... and the negative log-likelihoods are summed over ranks.
    """
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}")
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D token tensor, got shape {tuple(ids.shape)}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    spans = list(windows(ids.numel(), seq_len, stride))
    nll, scored = 0.0, 0
    # every rank runs as many forward passes (FSDP2 gathers weights in each, a collective):
    # a rank out of windows runs the first one again and scores nothing of it (n = 0)
    mine = spans[rank::world]
    rounds = -(-len(spans) // world)
    bar = mine + [(spans[0][0], spans[0][1], 0)] * (rounds - len(mine))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=desc, unit="window", leave=False)
    for begin, end, n in bar:
        x = ids[begin:end].unsqueeze(0).to(device)
        logits = model(x).logits[0].float()
        if n == 0:
            continue
        # logits at position i predict token i + 1; score the last n tokens of the window
        pred = logits[end - begin - 1 - n : end - begin - 1]
        target = x[0, end - begin - n :]
        nll += float(F.cross_entropy(pred, target, reduction="sum"))
        scored += n
    model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        total = torch.tensor([nll, scored], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        nll, scored = float(total[0]), int(total[1])
    return {"ppl": math.exp(nll / scored), "nll": nll, "scored_tokens": scored, "tokens": int(ids.numel()),
            "seq_len": seq_len, "stride": stride, "windows": len(spans)}
