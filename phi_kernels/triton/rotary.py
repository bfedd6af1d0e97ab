"""Rotary embedding, Triton kernel. Contract and math as in csrc/rotary/rotary.h.

Grid: (cdiv(max_seqlen, BLOCK_M), batch, heads). A program rotates BLOCK_M tokens of one head:
it loads the two halves of every rotary pair as [BLOCK_M, BLOCK_H] tiles (BLOCK_H >= rotary_dim/2),
rotates in fp32, and in the same program copies the pass-through dims [rotary_dim, head_dim)
when out is not x: one launch for partial rotary, where flash-attention's uses two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from phi_kernels.triton._interp import bf16_as_int16, kernel_view, load_as_fp32, to_storage


@triton.jit
def _rotary_kernel(
    X, OUT, COS, SIN, CU_SEQLENS, SEQLEN_OFFSETS,
    seqlen, seqlen_offset, rotary_dim, head_dim,
    stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh,
    IS_VARLEN: tl.constexpr, HAS_OFFSETS_TENSOR: tl.constexpr, INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr, COPY_PASS: tl.constexpr, BF16_AS_INT16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + b)
        length = tl.load(CU_SEQLENS + b + 1) - start
        x_base = X + start.to(tl.int64) * stride_xt + h * stride_xh
        o_base = OUT + start.to(tl.int64) * stride_ot + h * stride_oh
    else:
        length = seqlen
        x_base = X + b.to(tl.int64) * stride_xb + h * stride_xh
        o_base = OUT + b.to(tl.int64) * stride_ob + h * stride_oh
    if HAS_OFFSETS_TENSOR:
        offset = tl.load(SEQLEN_OFFSETS + b)
    else:
        offset = seqlen_offset

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # token index within the sequence
    row_ok = rows < length
    half = rotary_dim // 2
    cols = tl.arange(0, BLOCK_H)  # rotary pair index
    col_ok = cols < half
    mask = row_ok[:, None] & col_ok[None, :]

    cs_off = (rows + offset)[:, None] * half + cols[None, :]
    c = load_as_fp32(COS + cs_off, mask, BF16_AS_INT16)
    s = load_as_fp32(SIN + cs_off, mask, BF16_AS_INT16)
    if CONJUGATE:
        s = -s
    if INTERLEAVED:
        i0 = 2 * cols
        i1 = 2 * cols + 1
    else:
        i0 = cols
        i1 = cols + half
    x_rows = x_base + rows.to(tl.int64)[:, None] * stride_xt
    o_rows = o_base + rows.to(tl.int64)[:, None] * stride_ot
    x0 = load_as_fp32(x_rows + i0[None, :], mask, BF16_AS_INT16)
    x1 = load_as_fp32(x_rows + i1[None, :], mask, BF16_AS_INT16)
    o0 = x0 * c - x1 * s
    o1 = x1 * c + x0 * s
    out_ty = OUT.dtype.element_ty
    tl.store(o_rows + i0[None, :], to_storage(o0, out_ty, BF16_AS_INT16), mask=mask)
    tl.store(o_rows + i1[None, :], to_storage(o1, out_ty, BF16_AS_INT16), mask=mask)

    if COPY_PASS:
        pcols = rotary_dim + tl.arange(0, BLOCK_P)
        pmask = row_ok[:, None] & (pcols < head_dim)[None, :]
        tl.store(o_rows + pcols[None, :], tl.load(x_rows + pcols[None, :], mask=pmask), mask=pmask)


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, args, out: torch.Tensor):
    """The launch of _rotary_kernel for these tensors and options (a RotaryArgs), or None when
    there is nothing to rotate. aot_specs compiles the same launch."""
    from phi_kernels.triton._launch import Launch

    is_varlen = args.cu_seqlens is not None
    if is_varlen:
        batch, seqlen = args.cu_seqlens.numel() - 1, args.max_seqlen
        nheads, head_dim = x.shape[1], x.shape[2]
        sxb, sob = 0, 0
        sxt, sxh, sot, soh = x.stride(0), x.stride(1), out.stride(0), out.stride(1)
    else:
        batch, seqlen, nheads, head_dim = x.shape
        sxb, sxt, sxh = x.stride(0), x.stride(1), x.stride(2)
        sob, sot, soh = out.stride(0), out.stride(1), out.stride(2)
    rotary_dim = 2 * cos.shape[1]
    if batch == 0 or seqlen == 0 or nheads == 0:
        return None
    inplace = x is out or (x.device.type != "meta" and x.data_ptr() == out.data_ptr())
    block_m = 32 if seqlen >= 32 else triton.next_power_of_2(seqlen)
    grid = (triton.cdiv(seqlen, block_m), batch, nheads)
    kernel_args = (kernel_view(x), kernel_view(out), kernel_view(cos), kernel_view(sin), args.cu_seqlens,
                   args.seqlen_offsets, seqlen, args.seqlen_offset, rotary_dim, head_dim,
                   sxb, sxt, sxh, sob, sot, soh)
    meta = dict(IS_VARLEN=is_varlen, HAS_OFFSETS_TENSOR=args.seqlen_offsets is not None,
                INTERLEAVED=args.interleaved, CONJUGATE=args.conjugate,
                COPY_PASS=(not inplace) and rotary_dim < head_dim, BF16_AS_INT16=bf16_as_int16(x),
                BLOCK_M=block_m, BLOCK_H=triton.next_power_of_2(max(rotary_dim // 2, 1)),
                BLOCK_P=triton.next_power_of_2(max(head_dim - rotary_dim, 1)),
                num_warps=4)
    return Launch(_rotary_kernel, grid, kernel_args, meta)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, args, out: torch.Tensor) -> None:
    """Writes the rotation of x into out (which may be x). args: the RotaryArgs, already
    validated."""
    launch = rotary_launch(x, cos, sin, args, out)
    if launch is not None:
        launch()


def aot_specs():
    """phi-1.5 shapes for the static report: q and k of batch 4, seqlen 2048, 32 heads x 64,
    rotary 32, out-of-place (pass-through copied), fp16 and bf16."""
    from phi_kernels.rotary import RotaryArgs
    from phi_kernels.triton.aot import AotSpec

    batch, seqlen, heads, head_dim, rotary_dim = 4, 2048, 32, 64, 32
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(batch, seqlen, heads, head_dim, dtype=dtype, device="meta")
        cos = torch.empty(seqlen, rotary_dim // 2, dtype=dtype, device="meta")
        launch = rotary_launch(x, cos, cos, RotaryArgs(max_seqlen=seqlen), torch.empty_like(x))
        nbytes = 2 * (2 * batch * seqlen * heads * head_dim * 2) + 2 * seqlen * rotary_dim // 2 * 2
        specs.append(AotSpec.of_launch(f"rotary {AotSpec.type_name(dtype)} (q+k)", launch,
                                       flops=2 * 6 * batch * seqlen * heads * rotary_dim // 2, min_bytes=nbytes,
                                       shape=f"q,k ({batch}, {seqlen}, {heads}, {head_dim}), rotary {rotary_dim}"))
    return specs
