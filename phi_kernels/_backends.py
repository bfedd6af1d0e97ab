"""Backend choice, shared by every op.

Five backends implement each op behind one public function:

    cuda      hand-written CUDA C++ kernels in phi_kernels._C        (CUDA tensors)
    cuda-emu  the same CUDA C++ kernels, compiled for the host and run by the SIMT emulator
              (csrc/simt) in phi_kernels._simt                         (CPU tensors; slow, for
              testing: it lets every CUDA test case run without a GPU. Never chosen
              automatically, only when asked for)
    triton    Triton kernels in phi_kernels/triton/                   (CUDA tensors; CPU tensors
              under TRITON_INTERPRET=1, the interpreter the tests use)
    cpu       C++ kernels in phi_kernels._C                           (CPU tensors)
    ref       pure PyTorch, the oracle the others are tested against  (any device)

Choice, in order: the op's `backend=` argument, then the PHI_KERNELS_BACKEND environment
variable, then the fastest available for the tensors' device (cuda > triton > ref on a GPU,
cpu > ref on the CPU). An explicit request that cannot be honoured is an error that says why;
it never falls back silently.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from phi_kernels import _extension

BACKENDS = ("cuda", "cuda-emu", "triton", "cpu", "ref")
ENV_VAR = "PHI_KERNELS_BACKEND"
_AUTO_ORDER = {"cuda": ("cuda", "triton", "ref"), "cpu": ("cpu", "ref")}  # never "cuda-emu": a testing tool
_EMU_DESCRIPTION = ("CUDA C++ kernels of phi_kernels._C executed on CPU tensors by the SIMT emulator "
                    "(csrc/simt); slow, for testing")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # what it runs on when available, why not otherwise

    def __str__(self) -> str:
        width = max(map(len, BACKENDS))
        return f"{self.name:{width}s} {'yes' if self.available else 'no ':3s}  {self.reason}"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_ERROR = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _triton_import_error() -> str | None:
    return _TRITON_ERROR


def _no_gpu_status(name: str) -> BackendStatus:
    if name == "cuda":
        built = "built with" if _extension.cuda_compiled() else "built without"
        return BackendStatus(name, False, f"no CUDA device visible (phi_kernels._C {built} CUDA kernels)")
    if _triton_import_error() is None and triton_interpreting():
        return BackendStatus(name, True, "Triton kernels in the interpreter (TRITON_INTERPRET=1) on CPU tensors, slow")
    return BackendStatus(name, False, "no CUDA device visible (set TRITON_INTERPRET=1 to interpret on CPU tensors)")


def backend_status(name: str, device: torch.device | str | None = None) -> BackendStatus:
    """Whether backend `name` can run on tensors of `device` (default: this machine's best)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    # device None describes this machine: the GPU backends for GPU tensors if there is a GPU,
    # cpu, cuda-emu and ref for CPU tensors.
    if device is None:
        if name in ("cuda", "triton") and not torch.cuda.is_available():
            return _no_gpu_status(name)
        device = "cuda" if name in ("cuda", "triton") else "cpu"
    dev = torch.device(device).type
    if name == "ref":
        return BackendStatus(name, True, "pure PyTorch, any device")
    if name == "cpu":
        if dev != "cpu":
            return BackendStatus(name, False, f"runs on CPU tensors only, got {dev} tensors")
        err = _extension.load_error()
        if err is not None:
            return BackendStatus(name, False, err)
        return BackendStatus(name, True, f"C++ kernels in phi_kernels._C ({_extension.cpu_capability_description()})")
    if name == "cuda-emu":
        if dev != "cpu":
            return BackendStatus(name, False, f"runs on CPU tensors only, got {dev} tensors")
        err = _extension.emu_load_error()
        return BackendStatus(name, err is None, err or _EMU_DESCRIPTION)
    if name == "cuda":
        if dev != "cuda":
            return BackendStatus(name, False, f"runs on CUDA tensors only, got {dev} tensors")
        err = _extension.load_error()
        if err is not None:
            return BackendStatus(name, False, err)
        if not _extension.cuda_compiled():
            return BackendStatus(
                name, False, "phi_kernels._C was built without CUDA kernels (CPU torch or no CUDA toolkit)"
            )
        return BackendStatus(name, True, "CUDA C++ kernels in phi_kernels._C")
    # triton
    err = _triton_import_error()
    if err is not None:
        return BackendStatus(name, False, err)
    if dev == "cuda":
        return BackendStatus(name, True, "Triton kernels compiled for this GPU")
    if dev == "cpu" and triton_interpreting():
        return BackendStatus(name, True, "Triton kernels in the interpreter (TRITON_INTERPRET=1), slow")
    return BackendStatus(
        name, False, f"needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got {dev} tensors"
    )


def available_backends(device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    """Every backend's status for tensors on `device`. `print(*available_backends().values(), sep="\\n")`."""
    return {name: backend_status(name, device) for name in BACKENDS}


def cpp_ops(backend: str):
    """The torch.library namespace of the C++ ops behind a kernel backend: phi_kernels
    (phi_kernels._C) for "cuda" and "cpu" (each op dispatches on the tensors' device),
    phi_kernels_emu (phi_kernels._simt, the same schemas) for "cuda-emu"."""
    return torch.ops.phi_kernels_emu if backend == "cuda-emu" else torch.ops.phi_kernels


def resolve_backend(
    op: str,
    device: torch.device,
    requested: str | None,
    supported: Iterable[str] = BACKENDS,
    why_not: Callable[[str], str | None] | None = None,
) -> str:
    """The backend that runs `op` on `device`.

    `supported` lists the backends that implement the op; `why_not(backend)` returns a reason
    when a backend cannot handle this particular call (an option it lacks), else None.
    """
    supported = tuple(supported)
    source = "backend="
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], f"{ENV_VAR}="
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source}{requested!r} is not a backend; expected one of {BACKENDS}")
        if requested not in supported:
            raise BackendUnavailableError(f"{op}: backend {requested!r} does not implement it; it has {supported}")
        status = backend_status(requested, device)
        if not status.available:
            raise BackendUnavailableError(f"{op}: backend {requested!r} ({source}) is unavailable: {status.reason}")
        reason = why_not(requested) if why_not else None
        if reason:
            raise BackendUnavailableError(f"{op}: backend {requested!r} ({source}) cannot run this call: {reason}")
        return requested
    for name in _AUTO_ORDER.get(device.type, ("ref",)):
        if name in supported and backend_status(name, device).available and not (why_not and why_not(name)):
            return name
    return "ref"
