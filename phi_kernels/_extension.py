"""Loading phi_kernels._C, the compiled extension, and telling why it is not there.

Everything is computed once at import, into plain module constants, so that backend choice
inside a torch.compile'd function reads constants instead of tracing imports.
"""
from __future__ import annotations

import importlib

import torch

_BUILD_HINT = "build it with `pip install -e .` (see README.md)"


def _load() -> str | None:
    try:
        importlib.import_module("phi_kernels._C")
    except ImportError as e:  # missing, or built against another torch
        return f"the compiled extension phi_kernels._C could not be imported ({e}); {_BUILD_HINT}"
    return None


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(op name, dispatch key) for every phi_kernels op the extension registered for CPU / CUDA."""
    if LOAD_ERROR is not None:
        return frozenset()
    found = set()
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith("phi_kernels::"):
            for key in ("CPU", "CUDA"):
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                    found.add((qualname.split("::", 1)[1].split(".")[0], key))
    return frozenset(found)


LOAD_ERROR: str | None = _load()
_KERNELS = _registered_kernels()


def load_error() -> str | None:
    """None when phi_kernels._C imported; otherwise why it did not (as a sentence)."""
    return LOAD_ERROR


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `phi_kernels::<op>` for a dispatch key ("CPU" / "CUDA")."""
    return (op, dispatch_key) in _KERNELS


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA kernels (probed through the rotary op)."""
    return has_kernel("rotary_kernel", "CUDA")
