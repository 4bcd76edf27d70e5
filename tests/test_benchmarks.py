"""The benchmark scripts run end to end on tiny sizes and write their JSON."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration
def test_bench_step_writes_table_and_json(tmp_path):
    out = tmp_path / "step.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_step.py"), "--device", "cpu",
         "--sizes", "0.2", "--reps", "2", "--warmup", "1", "--backends", "reference", "--obs", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "x fused AdamW" in res.stdout
    data = json.loads(out.read_text())
    kinds = {(r["backend"], r["step"]) for r in data["rows"]}
    assert kinds == {("torch-fused-adamw+clip", "step")} | {("reference", k) for k in (
        "step", "prune-taylor", "prune-fisher", "prune-fisher-exp", "prune-fisher-prev", "prune-fisher-prev-exp",
        "prune-fisher-prev-pass-a", "prune-first", "prune-24", "prune-24-decay")}
    assert all(r["median_ms"] > 0 for r in data["rows"])
    assert data["device"]
    assert data["cubic_steps"] == 24  # the ramp's length is fixed, not 2 x calls
    obs = data["obs"]  # compensate='obs': one layer's sweeps and hooks, H's memory
    assert len(obs["sweeps"]) == 7 and all(s["median_ms"] > 0 for s in obs["sweeps"])
    assert obs["h_bytes_layer"] == 4 * (3 * 576**2 + 1536**2) and "compensate='obs'" in res.stdout


def test_bench_step_refuses_a_ramp_that_ends_before_the_last_call(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_step.py"), "--device", "cpu", "--sizes", "0.2",
         "--reps", "5", "--warmup", "2", "--cubic-steps", "8", "--out", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0
    assert "--cubic-steps 8 ends before the last of the 8 calls" in res.stderr
    assert not (tmp_path / "s.json").exists()


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_bench_memory_measures_what_it_computes(gpt2_dir, tmp_path):
    """Optimizer bytes per rank under DDP and FSDP2 with 2 processes: the measured buffers
    match the layout's formula (FSDP2: each rank holds its shards' state, plus a copy of
    its weight shards)."""
    out = tmp_path / "mem.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py"), "--model", gpt2_dir,
         "--measure", "2", "--worlds", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {(r["world"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(2, "ddp"), (2, "fsdp"), (8, "ddp"), (8, "fsdp")}
    for mode in ("ddp", "fsdp"):
        r = rows[(2, mode)]
        assert len(r["measured_bytes_per_param"]) == 2
        for got in r["measured_bytes_per_param"]:  # shards differ by at most a row
            assert abs(got - r["computed_bytes_per_param"]) / r["computed_bytes_per_param"] < 0.01
    # FSDP2 divides the state by the world size; DDP replicates it
    assert rows[(8, "fsdp")]["computed_bytes_per_param"] < rows[(2, "fsdp")]["computed_bytes_per_param"] / 3
    assert rows[(8, "ddp")]["computed_bytes_per_param"] == rows[(2, "ddp")]["computed_bytes_per_param"]


def test_bench_train_with_distillation_and_memory(gpt2_dir, corpus_dir, tmp_path):
    """bench_train.py on a tiny GPT-2: the distillation rows and each configuration's peak
    memory from a child process that builds it alone (the teacher's copy shows)."""
    out = tmp_path / "train.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--model", gpt2_dir, "--dataset",
         corpus_dir, "--rounds", "1", "--steps", "1", "--batch-size", "2", "--block-size", "32", "--fp32",
         "--backend", "reference", "--distill", "--memory", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert len(rows) == 7 and all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in rows.values())
    assert any("KL + SquareHead" in name for name in rows) and "peak mem GB" in res.stdout
    assert any("own CE" in name for name in rows)  # the unfused CE beside the KL, for its cost
    # each child's own peak, not the parent's (which held all seven copies): ru_maxrss, kept across
    # fork + exec, once reported the parent's peak for every row
    assert all(r["peak_memory_bytes"] < data["peak_memory_bytes_all"] for r in rows.values())


def test_bench_precision_emulated_products_are_nearer_native_than_fp32(gpt2_dir, corpus_dir, tmp_path):
    """bench_precision.py on a tiny GPT-2 (its Conv1D layers call addmm): the emulated bf16
    products' loss and gradients are nearer the native bf16 ones than fp32's are."""
    out = tmp_path / "precision.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_precision.py"), "--model", gpt2_dir, "--dataset",
         corpus_dir, "--rounds", "1", "--batch-size", "2", "--block-size", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp32", "emulated", "native"} and all(r["step_s"] > 0 for r in rows.values())
    assert rows["native"]["grad_rel_diff"] == 0.0
    assert rows["emulated"]["grad_rel_diff"] < rows["fp32"]["grad_rel_diff"] / 50  # measured: 5e-8 against 3e-3
    assert abs(rows["emulated"]["loss"] - rows["native"]["loss"]) < abs(rows["fp32"]["loss"] - rows["native"]["loss"])
