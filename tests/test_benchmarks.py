"""The benchmark scripts run end to end on tiny sizes and write their JSON."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_step_writes_table_and_json(tmp_path):
    out = tmp_path / "step.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_step.py"), "--device", "cpu",
         "--sizes", "0.2", "--reps", "2", "--warmup", "1", "--backends", "reference", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "x fused AdamW" in res.stdout
    data = json.loads(out.read_text())
    kinds = {(r["backend"], r["step"]) for r in data["rows"]}
    assert kinds == {("torch-fused-adamw+clip", "step"), ("reference", "step"), ("reference", "prune-taylor"),
                     ("reference", "prune-fisher"), ("reference", "prune-first")}
    assert all(r["median_ms"] > 0 for r in data["rows"])
    assert data["device"]


def test_bench_threshold_agrees_with_kthvalue(tmp_path):
    out = tmp_path / "thr.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_threshold.py"), "--device", "cpu",
         "--n", "300000", "--reps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(all agree)" in res.stdout  # the script exits non-zero when any theta differs
    methods = [r["method"] for r in json.loads(out.read_text())["rows"]]
    assert methods[0] == "torch.kthvalue" and len(methods) >= 2


def test_gpu_check_says_so_in_one_line_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a GPU is present: gpu_check.py would run the real check")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().count("\n") == 0 and "no CUDA GPU" in res.stdout
    assert not any(tmp_path.iterdir())
