"""Linear layer for a few rows (decoding): `linear(x, weight, bias)` is F.linear, with a CPU GEMV
kernel for the case torch handles worst.

    y = linear(x, layer.weight, layer.bias)        # x (..., in_features) -> (..., out_features)

Why: a decoding step multiplies one row (or one per sequence of a batch) by every weight
matrix. torch's F.linear sends such a product to its GEMM (MKL for fp32), which on the AMD EPYC
this was measured on took 1.3-1.9x the time of streaming the weight once at phi tiny's shapes
with one row (more with 4 rows, and 2-5x in bf16 / fp16). The kernel (csrc/linear) is a
register-blocked GEMV that reads each weight element once per call for all the rows,
accumulating in fp32. (numbers: benchmarks/bench_linear.py)

Backends (phi_kernels._backends.resolve_backend, supported "cpu" and "ref"):
    cpu   the C++ kernel when x has at most MAX_KERNEL_ROWS rows (the product of its leading
          dims), F.linear otherwise (a GEMM with many rows is what torch does well);
    ref   F.linear itself (the tests' oracle is fp64 math).
There is no CUDA or Triton kernel: on a GPU the choice is "ref", i.e. cuBLAS.
The kernel is for inference: when autograd records (grad enabled and x, weight or bias requires
grad), and under torch.compile, every backend calls F.linear, so gradients and compiled graphs
are torch's own.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from phi_kernels._backends import ENV_VAR, resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_ROWS = 16  # rows of x up to which the "cpu" backend runs the GEMV kernel


def _check_args(x, weight, bias) -> None:
    """ValueError naming the bad argument; nothing has been computed or written yet."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight must be a Tensor, got {type(weight).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be (..., in_features) with in_features = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(x.shape)}")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous (out_features, in_features) as nn.Linear stores it, got strides "
                         f"{weight.stride()} for shape {tuple(weight.shape)}; pass weight.contiguous() (once, not per "
                         "call)")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise ValueError(f"bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape (out_features,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")


def _records_grad(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


# The backend choice for (device, backend=, PHI_KERNELS_BACKEND): "cpu" and "ref" depend on
# nothing else (whether phi_kernels._C loaded is fixed at import), and a decoding step calls this
# once per layer, where resolve_backend's status strings would cost as much as a small layer.
# The environment is read only when backend= leaves the choice to it. Refusals raise every time
# (they are not stored).
_RESOLVED: dict[tuple, str] = {}
_SUPPORTED = ("cpu", "ref")


def _backend(device: torch.device, backend: str | None) -> str:
    key = (device, backend, os.environ.get(ENV_VAR) if backend is None else None)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = resolve_backend("linear", device, backend, supported=_SUPPORTED)
    return name


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """x @ weight.T + bias, as F.linear.

    x: (..., in_features); weight: (out_features, in_features), contiguous (nn.Linear's layout);
    bias: (out_features,) or None. One dtype (float32, float16 or bfloat16) and one device for
    all. Returns (..., out_features) in that dtype, a new contiguous tensor.
    backend: "cpu" or "ref" (default: PHI_KERNELS_BACKEND, else "cpu" for CPU tensors when the
    extension is built, "ref" otherwise). "cpu" runs the C++ GEMV kernel (fp32 accumulation) for
    at most MAX_KERNEL_ROWS rows of x and F.linear beyond; autograd and torch.compile always get
    F.linear (see the module docstring); so does autocast (its mixed dtypes are F.linear's rules).
    Bad arguments raise ValueError naming the argument.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    _check_args(x, weight, bias)
    name = _backend(x.device, backend)
    if name == "ref" or _records_grad(x, weight, bias) or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    n, k = weight.shape
    rows = x.numel() // k if k else math.prod(x.shape[:-1])
    if rows > MAX_KERNEL_ROWS:
        return F.linear(x, weight, bias)
    # (..., n). For a square weight that is x's shape, and empty_like skips parsing a shape
    # tuple: 1 us instead of 2.5 us here, on a call whose kernel takes ~3 us (phi's q, k, v and
    # dense projections are square).
    out = (torch.empty_like(x, memory_format=torch.contiguous_format) if n == k
           else x.new_empty((*x.shape[:-1], n)))
    # The op flattens x's leading dims (a view when it can) and copies a strided x or bias.
    torch.ops.phi_kernels.linear_out.default(x, weight, bias, out)
    return out
