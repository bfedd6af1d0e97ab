"""The benchmark harness every benchmarks/bench_<op>.py uses.

    def test_rotary_cpu(benchmark):
        bench(benchmark, lambda: apply_rotary(x, cos, sin, backend="cpu"),
              group="rotary fwd b4 s512 fp32", provider="phi_kernels cpu", ours=True,
              work=bytes_moved, unit="GB/s", shape=..., dtype=x.dtype, device=x.device)

A provider with roofline=True (e.g. a plain memory copy of the same bytes) is a yardstick,
not a competitor: it is left out of the best peer, and every row also gets its ratio to it.

`bench` warms up, synchronizes CUDA around every call, runs pytest-benchmark's pedantic rounds
and stores in extra_info: the figure of merit (work / median time), its unit, the provider,
whether it is ours, device name, dtype, shape and git commit. At the end of the session the
conftest plugin compares every provider of a group with the best peer (ours=False) measured in
the same run, writes `ratio_vs_best_peer` into the JSON and prints a table.

Quick mode (PHI_BENCH_QUICK=1, what CI uses): few rounds, every benchmark still runs once.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12, "GFLOP/s": 1e9, "tokens/s": 1.0}


def quick_mode() -> bool:
    return os.environ.get("PHI_BENCH_QUICK", "0") == "1"


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The instruction set our CPU kernels run with (csrc/cpu_isa; PHI_KERNELS_CPU_CAPABILITY)
    and torch's own (ATEN_CPU_CAPABILITY), for comparing like with like."""
    ours = torch.ops.phi_kernels.cpu_capability() if hasattr(torch.ops.phi_kernels, "cpu_capability") else "?"
    return f"ours {ours}, torch {torch.backends.cpu.get_cpu_capability()}"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {_cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"{cpu_capability()})")


def _synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def bench(
    benchmark,
    fn: Callable[[], object],
    *,
    group: str,
    provider: str,
    ours: bool,
    work: float,
    roofline: bool = False,
    unit: str,
    shape: object,
    dtype: torch.dtype | str,
    device: torch.device | str,
    rounds: int | None = None,
    warmup: int | None = None,
    min_time_s: float = 0.05,
    **extra: object,
) -> float:
    """Time fn (one call = `work` units of work) and record it; returns the throughput."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {sorted(UNITS)}, got {unit!r}")
    device = torch.device(device)
    run = _synchronized(fn, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup = warmup if warmup is not None else (1 if quick_mode() else 3)
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        run()
    one_call = (time.perf_counter() - t0) / max(warmup, 1)
    if rounds is None:
        # Enough rounds for a stable median, bounded so the whole suite stays short.
        budget = 0.5 if quick_mode() else 3.0
        rounds = int(min(max(budget / max(one_call, 1e-6), 3 if quick_mode() else 5), 200))
        if quick_mode():
            rounds = min(rounds, 5)
    # Calls shorter than min_time_s are grouped so timer resolution does not dominate.
    iterations = max(1, int(min_time_s / max(one_call, 1e-9))) if one_call < min_time_s else 1
    benchmark.group = group
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=0)
    median = benchmark.stats.stats.median
    throughput = work / median / UNITS[unit]
    benchmark.extra_info.update(
        provider=provider,
        ours=ours,
        roofline=roofline,
        throughput=throughput,
        unit=unit,
        work_per_call=work,
        device=device_name(device),
        cpu_capability=cpu_capability() if device.type == "cpu" else "",
        dtype=str(dtype).replace("torch.", ""),
        shape=str(shape),
        commit=git_commit(),
        quick=quick_mode(),
        **extra,
    )
    return throughput


def median_seconds(fn: Callable[[], object], device: torch.device | str, repeats: int = 5) -> float:
    """Median wall time of fn, for the rare benchmark that must time outside pytest-benchmark."""
    run = _synchronized(fn, torch.device(device))
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
