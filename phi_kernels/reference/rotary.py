"""Rotary embedding in plain PyTorch (the `ref` backend and the tests' oracle).

Same contract as the kernels (csrc/rotary/rotary.h): the first rotary_dim = 2 * cos.shape[1]
dims of each head are rotated, pairs (i, i + rotary_dim/2) or, interleaved, (2i, 2i + 1);
token t of sequence b uses row t + offset[b] of cos/sin; the remaining dims pass through.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotary_positions(
    x: Tensor, seqlen_offsets: int | Tensor = 0, cu_seqlens: Tensor | None = None
) -> Tensor:
    """Position of every token of x: (batch, seqlen) for the padded layout, (total,) packed."""
    dev = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        pos = torch.arange(seqlen, device=dev).expand(batch, seqlen)  # (B, T)
        off = seqlen_offsets.long().view(batch, 1) if isinstance(seqlen_offsets, Tensor) else seqlen_offsets
        return pos + off
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths)  # (total,)
    pos = torch.arange(x.shape[0], device=dev) - cu[seq_id]
    if isinstance(seqlen_offsets, Tensor):
        return pos + seqlen_offsets.long()[seq_id]
    return pos + seqlen_offsets


def apply_rotary_ref(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    interleaved: bool = False,
    seqlen_offsets: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    conjugate: bool = False,
) -> Tensor:
    """Rotated copy of x, math in fp32 (or fp64 for fp64 inputs), returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    rotary_dim = 2 * cos.shape[1]
    pos = rotary_positions(x, seqlen_offsets, cu_seqlens)
    c = cos.to(compute)[pos].unsqueeze(-2)  # (..., 1, rotary_dim/2): broadcast over heads
    s = sin.to(compute)[pos].unsqueeze(-2)
    if conjugate:
        s = -s
    xr = x[..., :rotary_dim].to(compute)
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
    else:
        x0, x1 = xr.chunk(2, dim=-1)
    o0 = x0 * c - x1 * s
    o1 = x1 * c + x0 * s
    rotated = torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved else torch.cat((o0, o1), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)
