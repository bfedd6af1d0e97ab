"""Runs untrusted Python programs (generated code plus its tests), each in its own sandbox.

    outcomes = run_programs([program, ...], SandboxLimits(cpu_seconds=5), workers=2)
    outcomes[0].passed, outcomes[0].status, outcomes[0].detail

One process per program, never `exec` in this process: every program goes to a fresh launcher
(`python -I phi_model/eval/_sandbox_child.py`, standard library only) that runs it in a new pid
and network namespace as an unprivileged uid, under CPU-time, wall-clock, memory (RLIMIT_AS),
process-count, file-size and open-file limits, in a fresh temporary directory that is removed
afterwards. See _sandbox_child.py for the process tree and why each guard is there.

A program passes when it runs to its end without an exception; SystemExit (sys.exit, exit()),
os._exit, a signal, a timeout or a limit are failures. A sandbox that cannot be set up (no
namespaces allowed, for instance) raises SandboxError instead of scoring every program as failed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_NOBODY = 65534
# Seconds the launcher gets beyond the program's wall-clock limit (its own start-up, cleanup)
# before this process kills it: the launcher enforces the limit itself, this is the backstop.
_BACKSTOP_SECONDS = 30.0


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up or did not answer (not a verdict on a program)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program. cpu_seconds rounds up to whole seconds (RLIMIT_CPU); max_processes
    counts every process and thread of the sandbox uid (RLIMIT_NPROC, shared by the programs
    running at the same time under that uid); uid/gid: the unprivileged ids the program runs
    as when the evaluator is root (ignored otherwise: a normal user is already unprivileged)."""
    cpu_seconds: float = 5.0
    wall_seconds: float = 15.0
    memory_bytes: int = 2 << 30
    max_processes: int = 32
    file_size_bytes: int = 16 << 20
    uid: int = _NOBODY
    gid: int = _NOBODY

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
                raise ValueError(f"SandboxLimits.{name} must be a number of seconds in (0, 3600], got {v!r}")
        for name, lo in (("memory_bytes", 64 << 20), ("max_processes", 1), ("file_size_bytes", 1 << 10)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"SandboxLimits.{name} must be an int >= {lo}, got {v!r}")
        for name in ("uid", "gid"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**32 - 1:
                raise ValueError(f"SandboxLimits.{name} must be an unprivileged id in [1, 2**32 - 2], got {v!r}")


@dataclass(frozen=True)
class Outcome:
    """How one program ended: status "passed", "failed" or "timeout"; detail: the exception or
    the limit; output_tail: the end of what it printed."""
    status: str
    detail: str = ""
    output_tail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> dict:
        return asdict(self)


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> Outcome:
    """Runs one program in a fresh sandbox (see the module docstring)."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
    request = dict(program=program, cpu_seconds=limits.cpu_seconds, wall_seconds=limits.wall_seconds,
                   memory_bytes=limits.memory_bytes, file_size_bytes=limits.file_size_bytes,
                   nproc=limits.max_processes, drop_to_uid=limits.uid, drop_to_gid=limits.gid, namespaces=True)
    try:
        done = subprocess.run([sys.executable, "-I", _LAUNCHER], input=json.dumps(request), capture_output=True,
                              text=True, timeout=limits.wall_seconds + _BACKSTOP_SECONDS,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
    except subprocess.TimeoutExpired:
        # The launcher's reaper dies with it (PR_SET_PDEATHSIG), taking the namespace along.
        return Outcome("timeout", f"sandbox launcher did not answer within {limits.wall_seconds + _BACKSTOP_SECONDS} s")
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict) or "status" not in result:
        raise SandboxError(f"sandbox launcher exited with code {done.returncode} without a result; stderr: "
                           f"{done.stderr.strip()[-1000:]}")
    if result["status"] == "error":
        raise SandboxError(f"sandbox could not run a program: {result.get('detail', '')}")
    return Outcome(status=result["status"], detail=result.get("detail", ""),
                   output_tail=result.get("output_tail", ""), seconds=float(result.get("seconds", 0.0)))


def run_programs(programs: list[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
                 on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Runs every program in its own sandbox, `workers` at a time (default: the CPU count);
    outcomes in the order of programs. on_done(i, outcome) is called as each one finishes."""
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    programs = list(programs)
    for i, p in enumerate(programs):
        if not isinstance(p, str):
            raise TypeError(f"programs[{i}] must be a str of Python source, got {type(p).__name__}")
    outcomes: list[Outcome | None] = [None] * len(programs)

    def one(i: int) -> None:
        outcomes[i] = run_program(programs[i], limits)
        if on_done is not None:
            on_done(i, outcomes[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(one, i) for i in range(len(programs))]:
            future.result()  # re-raises SandboxError
    return outcomes  # type: ignore[return-value]


def check_sandbox(limits: SandboxLimits = SandboxLimits()) -> None:
    """Raises SandboxError unless a trivial program passes and a failing one fails: run before
    scoring, so a broken sandbox is an error, not a score of zero."""
    if not run_program("pass\n", limits).passed:
        raise SandboxError("sandbox self-check: an empty program did not pass")
    if run_program("raise SystemExit(0)\n", limits).passed:
        raise SandboxError("sandbox self-check: sys.exit(0) was counted as a pass")
