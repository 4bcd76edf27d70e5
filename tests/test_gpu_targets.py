"""The Triton kernels compile for real GPU targets (sm_75 T4, sm_80 A100, sm_90 H100) without a
GPU, with no register spill: benchmarks/gpu_targets.py, run as a user runs it (a process
without TRITON_INTERPRET, which the rest of the suite sets)."""
import ast
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from agip.config import FISHER_POWERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_targets.py")
pytest.importorskip("triton")


def kernels_in_source():
    """Every @triton.jit function of kernels/ with a *_ptr argument, read from the source
    (not from gpu_targets.py's own discovery, which is what this checks)."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list) \
                    and any(a.arg.endswith("_ptr") for a in node.args.args):
                found.add(node.name)
    return found


def run(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gt.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out), "--md", str(tmp_path / "gt.md"), *extra],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), (tmp_path / "gt.md").read_text()


def check(data, targets=(75, 80, 90)):
    assert data["problems"] == []
    kernels = kernels_in_source()
    assert kernels >= {"_stats_kernel", "_refine_kernel", "_update_kernel"}
    rows = data["rows"]
    for cc in targets:  # every kernel compiled for every target, fp32 and bf16 buffers
        mine = [r for r in rows if r["cc"] == cc]
        assert {r["kernel"] for r in mine} == kernels
        assert all(r["regs"] > 0 and r["local"] == 0 and r["stack"] == 0 and "error" not in r for r in mine)
        assert all(0 < r["occupancy"] <= 1 for r in mine)
        for kernel in kernels:
            assert {r["dtype"] for r in mine if r["kernel"] == kernel} == {"fp32", "bf16"}
            # each constexpr value any launch can take is compiled at least once
            for name, values in data["domains"][kernel].items():
                assert sorted({r["constexprs"][name] for r in mine if r["kernel"] == kernel}) == values, name
    # the score's codes: Taylor (-1) and every Fisher power of the config
    assert data["domains"]["_update_kernel"]["SCORE"] == sorted({-1, *FISHER_POWERS.values()})
    assert set(data["domains"]["_update_kernel"]) >= {"PRUNABLE", "PRUNE_STEP", "AHEAD", "HAS_EMA", "BLOCK"}


def test_every_kernel_compiles_for_t4_a100_h100_without_spills(tmp_path):
    data, md = run(tmp_path, "--cover")
    check(data)
    assert data["cover"] and data["compiled"] < data["variants"]
    assert md.count("| _update_kernel | sm_") == 3
    assert all(t["sm_75_ms"] > t["sm_80_ms"] > t["sm_90_ms"] > 0 for t in data["step_times"])


@pytest.mark.slow
def test_every_variant_compiles_for_every_target(tmp_path):
    data, _ = run(tmp_path)
    check(data)
    assert data["compiled"] == data["variants"] and len(data["rows"]) == 3 * data["variants"]


@pytest.fixture
def gpu_targets():
    """The module, imported in this process with TRITON_INTERPRET kept as the suite sets it
    (its import removes it; put back by hand: monkeypatch would undo the putting back)."""
    saved = os.environ.get("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location("gpu_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return module


def test_a_spill_or_a_compile_error_fails_the_check(gpu_targets):
    ok = dict(kernel="k", cc=80, constexprs={}, dtype="fp32", regs=40, local=0, stack=0)
    assert gpu_targets.problems([ok]) == []
    assert "spills" in gpu_targets.problems([{**ok, "local": 8}])[0]
    assert "spills" in gpu_targets.problems([{**ok, "stack": 16}])[0]
    assert "does not compile" in gpu_targets.problems([{**ok, "error": "CompilationError: x"}])[0]


def test_occupancy_follows_the_occupancy_calculator(gpu_targets):
    # 32 registers, 4 warps: registers allow 64 warps, the SM's limit on sm_80 (64) and sm_75 (32)
    assert gpu_targets.occupancy(32, 0, 4, 80) == 1.0 and gpu_targets.occupancy(32, 0, 4, 75) == 1.0
    # 128 registers: 4096 per warp, 16 warps = 4 blocks of 4 warps: 16/64 on sm_80, 16/32 on sm_75
    assert gpu_targets.occupancy(128, 0, 4, 80) == 0.25 and gpu_targets.occupancy(128, 0, 4, 75) == 0.5
    # shared memory limits blocks too: 60 KB + 1 KB reserved a block, 164 KB an SM: 2 blocks
    assert gpu_targets.occupancy(32, 60 * 1024, 4, 80) == 2 * 4 / 64
