"""GPU self-check: one command that verifies every backend and times everything.

    python -m phi_kernels.selftest [--out selftest_results] [--quick]

1. Prints which backends run here (phi_kernels.available_backends()).
2. Runs the test suite (tests/): on a GPU machine the CUDA and Triton backends are tested on
   CUDA tensors with the same cases and tolerances as the CPU backends; without a GPU the GPU
   tests skip and say so.
3. Runs the benchmark suite (benchmarks/) and renders it with benchmarks.report.
4. Prints a verdict table (per test file: passed / failed / skipped) and writes
   <out>/selftest.json, <out>/benchmarks.json, <out>/report.md and plots.
Exit code 0 only when no test failed. Run it from a source checkout (it needs tests/ and
benchmarks/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _junit_verdicts(path: str) -> dict[str, Counter]:
    verdicts: dict[str, Counter] = defaultdict(Counter)
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "?").split(".")
        key = ".".join(module[:2]) if len(module) > 1 else module[0]
        if case.find("failure") is not None or case.find("error") is not None:
            verdicts[key]["failed"] += 1
        elif case.find("skipped") is not None:
            verdicts[key]["skipped"] += 1
        else:
            verdicts[key]["passed"] += 1
    return verdicts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Verify every backend on this machine and time everything")
    ap.add_argument("--out", default="selftest_results")
    ap.add_argument("--quick", action="store_true", help="quick benchmarks (few rounds, small sizes)")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(ROOT, "tests")):
        raise SystemExit("phi_kernels.selftest needs a source checkout (tests/ and benchmarks/ beside phi_kernels/)")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)

    import phi_kernels

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"device: {gpu or 'no CUDA GPU visible: GPU tests will skip'}")
    print(*phi_kernels.available_backends().values(), sep="\n")

    junit = os.path.join(out, "tests.xml")
    tests = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-rs", f"--junitxml={junit}"], cwd=ROOT)
    verdicts = _junit_verdicts(junit) if os.path.exists(junit) else {}

    bench_rc = None
    if not args.no_bench:
        env = dict(os.environ, PHI_BENCH_QUICK="1" if args.quick else os.environ.get("PHI_BENCH_QUICK", "0"))
        bench_json = os.path.join(out, "benchmarks.json")
        bench_rc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q",
                                   f"--benchmark-json={bench_json}"], cwd=ROOT, env=env).returncode
        if os.path.exists(bench_json):
            subprocess.run([sys.executable, "-m", "benchmarks.report", bench_json, "--out", out,
                            "--title", f"phi-kernels self-test benchmarks ({gpu or 'CPU'})"], cwd=ROOT)

    print("\n| test module | passed | failed | skipped |\n|---|---|---|---|")
    for module, c in sorted(verdicts.items()):
        print(f"| {module} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    failed = sum(c["failed"] for c in verdicts.values())
    verdict = "PASS" if tests.returncode == 0 and failed == 0 else "FAIL"
    print(f"\nverdict: {verdict} (pytest exit {tests.returncode}; benchmarks exit {bench_rc}); results in {out}")
    with open(os.path.join(out, "selftest.json"), "w") as f:
        json.dump({"device": gpu or "cpu", "verdict": verdict, "tests_exit": tests.returncode,
                   "bench_exit": bench_rc, "modules": {m: dict(c) for m, c in verdicts.items()},
                   "backends": {k: str(v) for k, v in phi_kernels.available_backends().items()}}, f, indent=1)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
