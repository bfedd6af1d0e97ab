"""Loading phi_kernels._C, the compiled extension, and telling why it is not there."""
from __future__ import annotations

import functools
import importlib

import torch

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (see README.md)"


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when phi_kernels._C imported; otherwise why it did not (as a sentence)."""
    try:
        importlib.import_module("phi_kernels._C")
    except ImportError as e:  # missing or built against another torch
        return f"the compiled extension phi_kernels._C could not be imported ({e}); {_BUILD_HINT}"
    return None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `phi_kernels::<op>` for a dispatch key (CPU / CUDA)."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"phi_kernels::{op}", dispatch_key)


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA kernels (probed through the rotary op)."""
    return has_kernel("rotary_kernel", "CUDA")
