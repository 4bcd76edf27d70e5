"""What a newcomer meets in the checkout root (issue 38): the top-level ``kernels/`` folder
never shadows the PyPI package ``kernels`` that transformers imports, so Python started in
the root (``python -c``, ``python -m``, ``torchrun -m agip.cli``, notebooks) and
``pip install --no-build-isolation -e .`` work there. Each runs in a subprocess whose
working folder is the root, as a user's would."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def in_root(*cmd, timeout=300):
    res = subprocess.run(list(cmd), cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def test_kernels_folder_is_no_regular_package():
    # a regular package named kernels in the root is what shadowed the distribution
    assert os.path.isdir(os.path.join(ROOT, "kernels"))
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


@pytest.mark.integration
def test_transformers_builds_a_llama_from_the_root():
    pytest.importorskip("transformers")
    code = ("import sys, kernels; from transformers import LlamaConfig, LlamaForCausalLM; "
            "m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, num_key_value_heads=2, vocab_size=64)); "
            "print(getattr(kernels, '__file__', None)); print(sum(p.numel() for p in m.parameters()))")
    out = in_root(sys.executable, "-c", code).stdout.split()
    if _has_kernels_distribution():  # the real one, not the root's folder
        assert out[0] != "None" and not out[0].startswith(os.path.join(ROOT, "kernels")), out
    assert int(out[1]) > 0


def _has_kernels_distribution() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.integration
def test_editable_install_without_build_isolation_from_the_root():
    # setuptools loads the entry points of every installed distribution, the kernels one
    # included (transformers >= 5.25 depends on it): it failed while the root shadowed it
    if not _has_kernels_distribution():
        pytest.skip("the PyPI package kernels is not installed (transformers >= 5.25 brings it)")
    res = in_root(sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--dry-run",
                  "-e", ".")
    assert "Would install agip" in res.stdout


@pytest.mark.integration
def test_torchrun_finetune_on_a_llama_from_the_root(gpt2_dir, corpus_dir, tmp_path):
    """The README's torchrun command, from the root, on a tiny Llama (the embedded default's
    architecture, whose import failed there)."""
    import transformers

    llama = tmp_path / "tiny-llama"
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                                   max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(llama))
    tok.save_pretrained(str(llama))
    out = tmp_path / "run"
    res = in_root(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                  "-m", "agip.cli", "finetune", "--model", str(llama), "--dataset", corpus_dir, "--steps", "2",
                  "--batch-size", "2", "--block-size", "32", "--eval-seq-len", "64", "--eval-max-tokens", "256",
                  "--target-sparsity", "0.5", "--out", str(out), "--no-progress")
    assert "perplexity on" in res.stdout
    assert (out / "report.json").is_file()
