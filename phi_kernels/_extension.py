"""Loading the compiled extensions, and telling why they are not there.

phi_kernels._C holds the ops of the "cuda" and "cpu" backends (torch.ops.phi_kernels.*).
phi_kernels._simt holds the ops of the "cuda-emu" backend (torch.ops.phi_kernels_emu.*): the
same CUDA C++ kernels compiled for the host and run on CPU tensors by the SIMT emulator
(csrc/simt), with the same schemas as their phi_kernels counterparts.

Everything is computed once at import, into plain module constants, so that backend choice
inside a torch.compile'd function reads constants instead of tracing imports.
"""
from __future__ import annotations

import importlib
import os

import torch

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (see README.md)"


def _load() -> str | None:
    try:
        importlib.import_module("phi_kernels._C")
    except ImportError as e:  # missing, or built against another torch
        return f"the compiled extension phi_kernels._C could not be imported ({e}); {_BUILD_HINT}"
    return None


def _load_emu() -> str | None:
    try:
        importlib.import_module("phi_kernels._simt")
    # Not only ImportError: the emulator is an optional testing tool, and a broken build of it
    # (say, a registration that throws while the library loads) must not break the package.
    except (ImportError, OSError, RuntimeError) as e:
        return (f"the SIMT emulator extension phi_kernels._simt could not be imported ({e}); "
                f"{_BUILD_HINT}")
    return None


def _registered_kernels(namespace: str, load_error: str | None,
                        keys: tuple[str, ...] = ("CPU", "CUDA")) -> frozenset[tuple[str, str]]:
    """(op name, dispatch key) for every `namespace` op an extension registered for `keys`."""
    if load_error is not None:
        return frozenset()
    found = set()
    prefix = namespace + "::"
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith(prefix):
            for key in keys:
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                    found.add((qualname.split("::", 1)[1].split(".")[0], key))
    return frozenset(found)


LOAD_ERROR: str | None = _load()
_KERNELS = _registered_kernels("phi_kernels", LOAD_ERROR)
EMU_LOAD_ERROR: str | None = _load_emu()
_EMU_KERNELS = frozenset(op for op, _ in _registered_kernels("phi_kernels_emu", EMU_LOAD_ERROR, ("CPU",)))


def load_error() -> str | None:
    """None when phi_kernels._C imported; otherwise why it did not (as a sentence)."""
    return LOAD_ERROR


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `phi_kernels::<op>` for a dispatch key ("CPU" / "CUDA")."""
    return (op, dispatch_key) in _KERNELS


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA kernels (probed through the rotary op)."""
    return has_kernel("rotary_out", "CUDA")


def emu_load_error() -> str | None:
    """None when phi_kernels._simt (the SIMT emulator's ops) imported; otherwise why it did not."""
    return EMU_LOAD_ERROR


def emu_has_kernel(op: str) -> bool:
    """Whether phi_kernels._simt registered `phi_kernels_emu::<op>` for CPU tensors."""
    return op in _EMU_KERNELS


def _cpu_capabilities() -> tuple[str, ...]:
    if LOAD_ERROR is not None or not hasattr(torch.ops.phi_kernels, "cpu_capabilities"):
        return ()
    return tuple(torch.ops.phi_kernels.cpu_capabilities())


CPU_CAPABILITIES: tuple[str, ...] = _cpu_capabilities()  # what this CPU supports, fixed at import


def cpu_capability_description() -> str:
    """The CPU kernels' instruction set now and what this CPU supports, e.g. "avx512; this CPU
    supports baseline, avx2, avx512" (csrc/cpu_isa: chosen by cpuid, or PHI_KERNELS_CPU_CAPABILITY)."""
    if not CPU_CAPABILITIES:
        return "capability unknown"
    supported = ", ".join(CPU_CAPABILITIES)
    if torch.compiler.is_compiling():  # the active one is read at each call; not while tracing
        return f"this CPU supports {supported}"
    # The active capability depends only on PHI_KERNELS_CPU_CAPABILITY (read by the C++ side at
    # each call): remember the answer per value, as every backend choice asks for it.
    forced = os.environ.get("PHI_KERNELS_CPU_CAPABILITY")
    described = _DESCRIPTIONS.get(forced)
    if described is None:
        try:
            active = torch.ops.phi_kernels.cpu_capability()
        except RuntimeError as e:  # PHI_KERNELS_CPU_CAPABILITY names something this CPU lacks
            active = str(e).splitlines()[0]
        described = _DESCRIPTIONS[forced] = f"{active}; this CPU supports {supported}"
    return described


_DESCRIPTIONS: dict[str | None, str] = {}
