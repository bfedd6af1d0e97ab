"""Small argument-checking helpers shared by the ops' public functions (validate, then act)."""
from __future__ import annotations

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1
FP32_MAX = 3.4028234663852886e38  # the largest finite float32


def is_int(x) -> bool:
    """A Python int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def byte_range(t: Tensor) -> tuple[int, int]:
    """[first, last + 1) addresses of the bytes t can touch (a superset for strided views)."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.nbytes
    if t.numel() == 0:
        return start, start
    last = 0
    for n, st in zip(t.shape, t.stride()):
        last += (n - 1) * st
    return start, start + (last + 1) * t.element_size()


def may_overlap(a: Tensor, b: Tensor) -> bool:
    """a and b touch a common address (conservative: two interleaved views that never touch the
    same element still count). Cheap: no storage objects, a few integer operations."""
    if a.device != b.device:
        return False
    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    return a0 < b1 and b0 < a1


def check_cu_seqlens(cu, name: str, like: Tensor, like_name: str) -> None:
    """ValueError naming the argument unless cu is a 1-D int32 tensor of (batch + 1,) offsets on
    like's device (the values are checked by cu_seqlens_lengths, which reads them back)."""
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        got = f"{cu.dtype}{tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be a 1-D int32 tensor of shape (batch + 1,), got {got}")
    if cu.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {cu.device}")


def cu_seqlens_lengths(cu: Tensor, name: str, rows: int, rows_what: str) -> Tensor:
    """The sequence lengths of a cu_seqlens tensor (int64, on the CPU: one host read-back), after
    checking that it starts at 0, never decreases and ends at `rows` (`rows_what` says which)."""
    c = cu.cpu().long()
    lengths = c[1:] - c[:-1]
    if int(c[0]) != 0 or bool((lengths < 0).any()) or int(c[-1]) != rows:
        shown = c.tolist() if c.numel() <= 16 else f"{c[:8].tolist()} ... {c[-8:].tolist()}"
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at {rows} ({rows_what}), got {shown}")
    return lengths
