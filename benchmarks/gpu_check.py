"""One GPU command: the CUDA/Triton tests, the step benchmark at 10M, 50M and 135M
parameters and the threshold benchmark, with one Markdown table and one JSON under
``benchmarks/results/`` named after the GPU. Meant to finish in well under 8 minutes.

    python benchmarks/gpu_check.py            # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --skip-tests

On a machine without a CUDA GPU it says so in one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = ["tests/test_backends.py", "tests/test_triton_backend.py", "tests/test_backends_optimizer.py", "tests/test_golden.py"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 50, 135])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, cuda {torch.version.cuda}); nothing to do")
        return 0
    sys.path.insert(0, HERE)
    import bench_step
    import bench_threshold

    gpu = torch.cuda.get_device_name(0)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    os.makedirs(args.out, exist_ok=True)
    result = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "started": time.strftime("%F %T")}
    if not args.skip_tests:
        # the tests run with compiled kernels: the interpreter must be off
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *TESTS], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        print(proc.stdout[-3000:])
        result["tests"] = {"returncode": proc.returncode, "summary": tail, "seconds": round(time.time() - t0, 1)}
    # the cubic rows' ramp: bench_step's, longer only when the calls (warm-up + reps + 1)
    # would reach its end
    cubic = max(bench_step.CUBIC_STEPS, bench_step.WARMUP + args.reps + 2)
    step_rows = bench_step.main(["--device", "cuda", "--sizes", *map(str, args.sizes), "--reps", str(args.reps),
                                 "--cubic-steps", str(cubic),
                                 "--out", os.path.join(args.out, f"bench_step-{tag}.json")])
    thr_rows = bench_threshold.main(["--device", "cuda", "--reps", "5",
                                     "--out", os.path.join(args.out, f"bench_threshold-{tag}.json")])
    result.update(step=step_rows, threshold=thr_rows)
    lines = [f"# GPU check: {gpu}", "", f"torch {torch.__version__}, CUDA {torch.version.cuda}", ""]
    if "tests" in result:
        lines += [f"Tests ({' '.join(TESTS)}): {result['tests']['summary']} in {result['tests']['seconds']} s", ""]
    lines += ["| params | backend | step | median ms | GB/s (byte model) | × fused AdamW + clip |", "|---|---|---|---|---|---|"]
    for r in step_rows:
        gb = f"{r['gbps_by_model']:.0f}" if "gbps_by_model" in r else "-"
        lines.append(f"| {r['size_m']}M | {r['backend']} | {r['step']} | {r['median_ms']:.3f} | {gb} | "
                     f"{r['ratio_to_fused_adamw']:.2f} |")
    if thr_rows:
        lines += ["", "| threshold method | median s | × torch.kthvalue |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['median_s']:.4f} | {r['speedup_vs_kthvalue']:.1f} |" for r in thr_rows]
    with open(os.path.join(args.out, f"gpu_check-{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"gpu_check-{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("\n".join(lines))
    print(f"wrote {args.out}/gpu_check-{tag}.md and .json")
    return 0 if result.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
