"""The package's layout as docs/design.md draws it, checked on the source: no import
circle (lazy imports inside functions count too), the library never imports the harness,
and the kernels' argument bundles are declared once, in the order of the C structs."""
import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "agip")
# docs/design.md, "Module map": the harness runs jobs; the library is what a training loop imports
HARNESS = {"agip.train", "agip.cli", "agip.methods", "agip.baselines", "agip.data", "agip.models",
           "agip.evaluate", "agip.report", "agip.launch"}


def modules() -> dict:
    """agip module name -> the set of agip modules it imports (anywhere in the file)."""
    found = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
            found[name] = imports_of(ast.parse(open(path).read()), package)
    return found


def imports_of(tree, package: str) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("agip")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("agip"):
                continue
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # "from . import nm" imports agip.nm
    return out


def graph() -> dict:
    mods = modules()
    return {m: {i for i in deps if i in mods and i != m and not m.startswith(i + ".")} for m, deps in mods.items()}


def test_no_import_circle():
    g = graph()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(d):] + [d]) if d in path
                            else f"import circle through {m} -> {d}")
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_the_library_never_imports_the_harness():
    g = graph()
    library = {m for m in g if m not in HARNESS and m != "agip"}
    assert "agip.optimizer" in library and "agip.backends.fused" in library
    bad = sorted((m, d) for m in library for d in g[m] if d in HARNESS)
    assert not bad, f"library -> harness imports: {bad}"


def test_the_graph_sees_lazy_imports():
    tree = ast.parse("def f():\n    from .train import finetune\n")
    assert imports_of(tree, "agip") == {"agip.train", "agip.train.finetune"}


def c_struct(name: str) -> list:
    src = open(os.path.join(ROOT, "csrc", "agip_math.h")).read()
    body = re.search(rf"struct {name} {{(.*?)}};", src, re.S).group(1)
    return [f.strip() for f in re.sub(r"\bfloat\b", "", body).replace(";", "").split(",")]


def test_kernel_arguments_are_declared_once_in_the_c_order():
    from agip.backends import ScoreArgs, UpdateArgs

    numbers = [f.name for f in dataclasses.fields(UpdateArgs) if f.type == "float"]
    assert c_struct("UpdateArgs") == numbers
    header = open(os.path.join(ROOT, "csrc", "agip_math.h")).read()
    assert f"UPDATE_ARGS = {len(numbers)};" in header
    assert c_struct("ScoreArgs") == [f.name for f in dataclasses.fields(ScoreArgs)][1:]  # fisher_q apart


def test_the_cpp_cache_tag_follows_the_cpu(monkeypatch, tmp_path):
    from agip import backends

    monkeypatch.setenv("AGIP_CACHE_DIR", str(tmp_path))
    here = backends.cache_dir("cpp")
    assert backends.cache_dir("cpp") == here
    monkeypatch.setattr(backends, "native_target", lambda: "#define __AVX2__ 1")  # another CPU
    other = backends.cache_dir("cpp")
    monkeypatch.setattr(backends, "native_target", lambda: "#define __AVX512F__ 1")
    assert len({here, other, backends.cache_dir("cpp")}) == 3
    assert backends.cache_dir("reference").endswith(os.path.basename(here).split("-cpu")[0].replace("cpp", "reference"))


def test_a_cpu_build_target_has_a_cache_folder_of_its_own(monkeypatch, tmp_path):
    """AGIP_CPU_TARGET=avx2 builds the code an AVX2 CPU runs, on any x86-64 machine that has
    AVX2, beside the native build (not over it); a target the CPU lacks, or an unknown one, fails."""
    from agip import backends

    monkeypatch.setenv("AGIP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AGIP_CPU_TARGET", raising=False)
    native = backends.cache_dir("cpp")
    assert backends.cpu_march() == "native"
    monkeypatch.setenv("AGIP_CPU_TARGET", "avx2")
    assert backends.cpu_march() == "x86-64-v3"
    if "#define __AVX2__ 1" in backends.native_target("x86-64-v3"):  # a compiler that knows the level
        assert backends.cache_dir("cpp") != native
    monkeypatch.setenv("AGIP_CPU_TARGET", "sse2")
    with pytest.raises(ValueError, match="AGIP_CPU_TARGET must be one of"):
        backends.cache_dir("cpp")


@pytest.mark.slow
def test_the_avx2_build_gives_the_native_builds_masks(tmp_path):
    """The scores-ahead tests (masks and thresholds bit-identical to the reference backend) on
    the AVX2 build, whatever this CPU's own level."""
    from agip import backends

    if "#define __AVX2__ 1" not in backends.native_target("native"):
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "AGIP_CPU_TARGET": "avx2", "AGIP_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_scores_ahead.py",
                          "tests/test_cpp_backend.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:]
    assert any(p.startswith("cpp-") for p in os.listdir(tmp_path))


@pytest.mark.integration
def test_a_second_checkout_runs_its_own_kernels(tmp_path):
    # an editable install maps agip.csrc and agip.kernels to its own checkout; a copy of the
    # sources (a git worktree of another commit) imported from its root must compile and run
    # its own C++ sources and Triton kernels, not the installed checkout's
    import shutil

    other = tmp_path / "checkout"
    for name in ("agip", "csrc", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), other / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), other / "setup.py")
    code = ("import agip, agip.backends as b; print(agip.__file__); print(b.source_dir('csrc')); "
            "print(b.source_dir('kernels')); import agip.backends.triton; import agip.kernels.common as k; print(k.__file__)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=other, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert len(lines) == 4 and all(line.startswith(str(other)) for line in lines), lines


def test_a_killed_builds_lock_is_cleared_only_when_stale(tmp_path):
    """torch's cpp_extension leaves ``lock`` behind when a build is killed; the next import
    would wait on it forever. A fresh lock (a build running now) is left alone."""
    from agip import backends

    lock = tmp_path / "lock"
    lock.write_text("")
    assert not backends.clear_stale_lock(str(tmp_path)) and lock.exists()
    old = os.path.getmtime(lock) - backends.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="build lock"):
        assert backends.clear_stale_lock(str(tmp_path))
    assert not lock.exists() and not backends.clear_stale_lock(str(tmp_path))
