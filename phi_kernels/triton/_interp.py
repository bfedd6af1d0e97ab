"""Helpers for running Triton kernels under TRITON_INTERPRET=1 (the CPU tests).

The interpreter of Triton 3.8 stores bf16 as raw uint16 words, and its arithmetic and tl.dot run
on those bits, so bf16 results are wrong there. Launchers pass bf16 tensors to interpreted kernels as
int16 views, and kernels decode/encode them with `load_as_fp32` / `to_storage` when the
constexpr BF16_AS_INT16 is set. Compiled kernels never take that path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from phi_kernels._backends import triton_interpreting


def bf16_as_int16(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu" and triton_interpreting()


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor to hand to a kernel: bf16 as int16 under the interpreter, unchanged otherwise."""
    return t.view(torch.int16) if bf16_as_int16(t) else t


@triton.jit
def load_as_fp32(ptr, mask, BF16_AS_INT16: tl.constexpr):
    if BF16_AS_INT16:
        bits = tl.load(ptr, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def to_storage(x, dtype: tl.constexpr, BF16_AS_INT16: tl.constexpr):
    """fp32 -> the pointer's element type (bf16 bits, rounded to nearest even, when BF16_AS_INT16)."""
    if BF16_AS_INT16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).to(tl.int16)
    return x.to(dtype)
