"""Shared helpers: a tiny transformer-shaped model and a deterministic data stream."""
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
# Tests never reach a model hub (read by huggingface_hub when it is first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels run in triton's interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; deselected by default (run with -m slow)")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down_proj(torch.tanh(self.up_proj(torch.tanh(self.q_proj(h)))))


class TinyLM(nn.Module):
    """Embedding -> blocks (in a ModuleList, as in real transformers) -> norm -> untied head."""

    def __init__(self, vocab=37, d=16, n_layers=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():  # no exact zeros anywhere, so a zeroed entry means "pruned"
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def batch(step, vocab=37, shape=(4, 12)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1000 + step))


def train(model, opt, steps, start=0, after_step=None):
    """Run ``steps`` AGIP steps on the deterministic stream; return the losses."""
    losses = []
    for t in range(start, start + steps):
        loss = model(batch(t))
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        losses.append(loss.item())
        if after_step is not None:
            after_step(t)
    return losses


@pytest.fixture
def tiny():
    return TinyLM()
