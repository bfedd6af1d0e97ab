"""Rotary position embeddings: public API, validation, op registration and autograd.

    cos, sin = rotary_cos_sin(seqlen, rotary_dim=32, base=10000.0)     # (seqlen, 16) each
    q = apply_rotary(q, cos, sin)                  # q: (batch, seqlen, heads, head_dim)
    qkv = apply_rotary_qkv(qkv, cos, sin)          # q and k of (batch, seqlen, 3, heads, head_dim)

The API follows flash-attention's `apply_rotary_emb`, so code can switch between the two.
Kernels: csrc/rotary/ (CUDA and CPU C++, shared math in rotary.h), phi_kernels/triton/rotary.py;
the oracle: phi_kernels/reference/rotary.py. The "cuda-emu" backend runs the CUDA kernel on CPU
tensors under the SIMT emulator (phi_kernels._simt), for testing.

Registration: `phi_kernels::rotary` (functional, with autograd) and `phi_kernels::rotary_`
(in-place) are torch.library custom ops with fake implementations, so torch.compile traces
them; they launch the C++ out-variant op `phi_kernels::rotary_out` (csrc/op_schemas.h), its
emulated twin `phi_kernels_emu::rotary_out` (same schema) or the Triton kernel. The kernels'
options travel as one RotaryArgs, positional only at the torch.library boundary.
The backward of a rotation is the conjugate rotation (sin -> -sin) of the gradient.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from phi_kernels._backends import cpp_ops, resolve_backend
from phi_kernels._checks import INT32_MAX as _INT32_MAX
from phi_kernels._checks import check_cu_seqlens as _check_cu_seqlens
from phi_kernels._checks import cu_seqlens_lengths as _cu_seqlens_lengths
from phi_kernels._checks import is_int as _is_int
from phi_kernels._checks import may_overlap as _may_overlap
from phi_kernels._op_args import OpArgs
from phi_kernels.reference.rotary import apply_rotary_ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotary_cos_sin(
    seqlen: int,
    rotary_dim: int,
    *,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin caches of shape (seqlen, rotary_dim // 2) for positions 0..seqlen-1.

    Frequency i is base ** (-2i / rotary_dim) (inv_freq over the rotary dims, as phi and
    GPT-NeoX). Angles are computed in fp64 and rounded once to `dtype`: at position 2047 an
    fp32 angle would already be off by ~1e-4 rad.
    """
    if not isinstance(seqlen, int) or seqlen < 0:
        raise ValueError(f"seqlen must be a non-negative int, got {seqlen!r}")
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even int, got {rotary_dim!r}")
    if base <= 0:
        raise ValueError(f"base must be positive, got {base!r}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim))
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64, device=device), inv_freq)  # (T, rd/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# --------------------------------------------------------------------------- validation


def _check_args(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace=False) -> int | None:
    """Raise ValueError naming the bad argument. Returns the max_seqlen the kernels should use
    with cu_seqlens: the longest sequence (read back from cu_seqlens; max_seqlen under
    torch.compile, where nothing is read back), so a max_seqlen far above it costs nothing."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (seqlen_ro, rotary_dim / 2), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if cos.shape[0] > _INT32_MAX:
        raise ValueError(f"cos/sin have {cos.shape[0]} rows, more than the kernels index (2**31 - 1)")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}"
                             " (pass cu_seqlens for the packed (total_tokens, heads, head_dim) layout)")
        batch, seqlen = x.shape[0], x.shape[1]
        if max_seqlen is not None and max_seqlen != seqlen:
            raise ValueError(f"max_seqlen is for the packed layout; got {max_seqlen} with x of shape {tuple(x.shape)}")
    else:
        if x.dim() != 3:
            raise ValueError(f"with cu_seqlens, x must be (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
        _check_cu_seqlens(cu_seqlens, "cu_seqlens", x, "x")
        if not _is_int(max_seqlen) or not 0 <= max_seqlen <= _INT32_MAX:
            raise ValueError(f"max_seqlen must be an int in [0, 2**31 - 1] with cu_seqlens, got {max_seqlen!r}")
        batch, seqlen = cu_seqlens.numel() - 1, max_seqlen
    head_dim = x.shape[-1]
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim == 0 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim = 2 * cos.shape[1] = {rotary_dim} must be in [2, head_dim = {head_dim}]")
    if x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in its last dim (head_dim), got strides {x.stride()}")

    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.shape != (batch,) or seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seqlen_offsets must be an int tensor of shape (batch,) = ({batch},), got "
                             f"{seqlen_offsets.dtype}{tuple(seqlen_offsets.shape)}")
        if seqlen_offsets.device != x.device:
            raise ValueError(f"seqlen_offsets must be on x's device {x.device}, got {seqlen_offsets.device}")
    elif not _is_int(seqlen_offsets) or seqlen_offsets < 0:
        raise ValueError(f"seqlen_offsets must be a non-negative int or a (batch,) tensor, got {seqlen_offsets!r}")

    if inplace and not torch.compiler.is_compiling():
        # torch's rule for in-place ops: the written tensor must not have two elements at one
        # address (an expand()ed x would be rotated once per alias), nor share memory with an input.
        if torch._debug_has_internal_overlap(x) == 1:
            raise ValueError(f"inplace=True needs an x whose elements have distinct memory locations; x of shape "
                             f"{tuple(x.shape)} and strides {x.stride()} has overlapping elements (an expand()ed or "
                             "stride-0 tensor): pass inplace=False or x.clone()")
        for name, t in (("cos", cos), ("sin", sin), ("cu_seqlens", cu_seqlens), ("seqlen_offsets", seqlen_offsets)):
            if isinstance(t, Tensor) and _may_overlap(x, t):
                raise ValueError(f"inplace=True: x shares memory with {name}; the rotation would overwrite it "
                                 "while reading it")

    if not torch.compiler.is_compiling():
        longest = _check_positions(cos.shape[0], batch, seqlen, seqlen_offsets, cu_seqlens, x.shape[0])
        if cu_seqlens is not None:
            return longest
    return max_seqlen if cu_seqlens is not None else None


def _check_positions(seqlen_ro, batch, seqlen, seqlen_offsets, cu_seqlens, rows) -> int:
    """Every row of x is covered exactly once and every position read exists in cos/sin.
    (Reads tensors back to the host: on a GPU this syncs once; it is what keeps a bad
    cu_seqlens or a too-short cache from reading or writing out of bounds.) Returns the
    longest sequence."""
    if cu_seqlens is None and not isinstance(seqlen_offsets, Tensor):  # plain ints: no tensor work
        need = seqlen_offsets + seqlen if batch and seqlen else 0
        if need > seqlen_ro:
            raise ValueError(f"cos/sin have {seqlen_ro} rows but seqlen + seqlen_offsets needs {need}; "
                             "build a longer cache with rotary_cos_sin")
        return seqlen
    if cu_seqlens is None:  # dense with per-row offsets (batched decoding): one small read-back
        offs = seqlen_offsets.tolist()
        if min(offs, default=0) < 0:
            raise ValueError(f"seqlen_offsets must be non-negative, got {offs}")
        need = max(offs) + seqlen if batch and seqlen else 0
        if need > seqlen_ro:
            raise ValueError(f"cos/sin have {seqlen_ro} rows but seqlen + seqlen_offsets needs {need}; "
                             "build a longer cache with rotary_cos_sin")
        return seqlen
    lengths = _cu_seqlens_lengths(cu_seqlens, "cu_seqlens", rows, "the rows of x")
    longest = int(lengths.max())
    if longest > seqlen:
        raise ValueError(f"max_seqlen={seqlen} is smaller than the longest sequence in cu_seqlens ({longest})")
    if isinstance(seqlen_offsets, Tensor):
        off = seqlen_offsets.cpu().long()
        if bool((off < 0).any()):
            raise ValueError(f"seqlen_offsets must be non-negative, got {off.tolist()}")
    else:
        off = torch.full((batch,), seqlen_offsets, dtype=torch.long)
    need = int(torch.where(lengths > 0, off + lengths, 0).max()) if batch else 0
    if need > seqlen_ro:
        raise ValueError(f"cos/sin have {seqlen_ro} rows but seqlen + seqlen_offsets needs {need}; "
                         "build a longer cache with rotary_cos_sin")
    return longest


# --------------------------------------------------------------------------- ops


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotaryArgs(OpArgs):
    """What the kernels are given besides x, cos, sin and out: the options of PHI_ROTARY_OPTIONS
    in csrc/op_schemas.h, same names, same order (phi_kernels/_op_args.py)."""

    seqlen_offsets: Tensor | None = None  # (batch,) int32 first positions, or None: seqlen_offset for all
    seqlen_offset: int = 0
    cu_seqlens: Tensor | None = None  # (batch + 1,) int32: the packed layout; None: dense
    max_seqlen: int  # the longest sequence (dense: x.shape[1])
    interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + rotary_dim / 2)
    conjugate: bool = False  # rotate by -theta (the backward)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, args: RotaryArgs, backend: str, out: Tensor) -> None:
    if backend == "triton":
        from phi_kernels.triton.rotary import rotary_triton

        rotary_triton(x, cos, sin, args, out)
    else:  # "cpu", "cuda" or "cuda-emu": the C++ op
        cpp_ops(backend).rotary_out(x, cos, sin, *args.positional(), out)


# The torch.library boundary: the custom ops take the RotaryArgs fields positionally (their
# schemas are written from the fields), then the backend name.
_N_OPTIONS = len(RotaryArgs.names())


def _unpack(flat: tuple) -> tuple[RotaryArgs, str]:
    return RotaryArgs.from_positional(flat[:_N_OPTIONS]), flat[_N_OPTIONS]


def _rotary_impl(x: Tensor, cos: Tensor, sin: Tensor, *flat) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, cos, sin, *_unpack(flat), out)
    return out


_rotary = torch.library.custom_op(
    "phi_kernels::rotary", _rotary_impl, mutates_args=(),
    schema=f"(Tensor x, Tensor cos, Tensor sin, {RotaryArgs.schema()}, str backend) -> Tensor")
_rotary_ = torch.library.custom_op(
    "phi_kernels::rotary_", lambda x, cos, sin, *flat: _launch(x, cos, sin, *_unpack(flat), x), mutates_args=("x",),
    schema=f"(Tensor(a!) x, Tensor cos, Tensor sin, {RotaryArgs.schema()}, str backend) -> ()")


@_rotary.register_fake
def _(x, cos, sin, *flat):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_rotary_.register_fake
def _(x, cos, sin, *flat):
    return None


def _rotary_setup_context(ctx, inputs, output):
    _, cos, sin, *flat = inputs
    args, backend = _unpack(flat)
    ctx.save_for_backward(cos, sin, *args.tensors())
    ctx.args = args.without_tensors()
    ctx.backend = backend


def _rotary_backward(ctx, grad):
    cos, sin, *tensors = ctx.saved_tensors
    args = ctx.args.with_tensors(tensors)
    # out = R(theta) x  =>  dL/dx = R(theta)^T dL/dout = R(-theta) dL/dout; pass-through dims copy.
    backward = dataclasses.replace(args, conjugate=not args.conjugate)
    grad_x = _rotary(grad.contiguous(), cos, sin, *backward.positional(), ctx.backend)
    return (grad_x, None, None) + (None,) * (_N_OPTIONS + 1)


_rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


class _RotaryInplace(torch.autograd.Function):
    """In-place rotation that autograd can see through (the op mutates x; mark it dirty). Takes
    the op's arguments as _rotary_ does (RotaryArgs positionally, then the backend)."""

    @staticmethod
    def forward(ctx, x, cos, sin, *flat):
        _rotary_(x, cos, sin, *flat)
        ctx.mark_dirty(x)
        _rotary_setup_context(ctx, (x, cos, sin, *flat), x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _rotary_backward(ctx, grad)


# --------------------------------------------------------------------------- public API


def apply_rotary(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Rotate the first rotary_dim = 2 * cos.shape[1] dims of every head of x.

    x: (batch, seqlen, heads, head_dim), or (total_tokens, heads, head_dim) packed with
       cu_seqlens (batch + 1,) int32 and max_seqlen.
    cos, sin: (seqlen_ro, rotary_dim / 2), x's dtype and device (see rotary_cos_sin).
    interleaved: rotate pairs (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim/2) (phi, NeoX).
    inplace: write into x (and return it).
    seqlen_offsets: position of each sequence's first token: an int, or a (batch,) int tensor
       (KV-cache decoding). Token t uses row t + offset of cos/sin.
    cu_seqlens must start at 0, be non-decreasing and end at total_tokens (every row of x is in
       exactly one sequence); max_seqlen is an int >= the longest sequence (the kernels are
       given the longest, so a larger value costs nothing). inplace=True refuses an x whose
       elements share memory (expand()ed, stride 0) or that shares memory with cos / sin, as
       torch's in-place ops do. Every check runs before any backend is called.
    backend: "cuda", "cuda-emu", "triton", "cpu" or "ref" (default: PHI_KERNELS_BACKEND, else the
       fastest available for x's device; "cuda-emu" only when asked for).
    Returns the rotated tensor; dims past rotary_dim are unchanged. Differentiable w.r.t. x.
    """
    kernel_max_seqlen = _check_args(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace)
    name = resolve_backend("apply_rotary", x.device, backend)
    if name == "ref":
        out = apply_rotary_ref(x, cos, sin, interleaved=interleaved, seqlen_offsets=seqlen_offsets,
                               cu_seqlens=cu_seqlens)
        return x.copy_(out) if inplace else out
    if isinstance(seqlen_offsets, Tensor):
        offsets_t, offset = seqlen_offsets.to(torch.int32).contiguous(), 0
    else:
        offsets_t, offset = None, seqlen_offsets
    args = RotaryArgs(seqlen_offsets=offsets_t, seqlen_offset=offset, cu_seqlens=cu_seqlens,
                      max_seqlen=x.shape[1] if cu_seqlens is None else kernel_max_seqlen, interleaved=interleaved)
    cos, sin = cos.contiguous(), sin.contiguous()
    if not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling():
        # No autograd, no tracing (decoding, evaluation): launch directly; the custom op's
        # dispatch would cost more than rotating one token.
        out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        _launch(x, cos, sin, args, name, out)
        return out
    if inplace:
        return _RotaryInplace.apply(x, cos, sin, *args.positional(), name)
    return _rotary(x, cos, sin, *args.positional(), name)


def apply_rotary_qkv(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | Tensor = 0,
    backend: str | None = None,
) -> Tensor:
    """Rotate q and k of a packed qkv (batch, seqlen, 3, heads, head_dim) in one launch.

    q and k are viewed as one (batch, seqlen, 2 * heads, head_dim) tensor (a view: the 3-axis
    and the heads axis merge because q and k are adjacent), so a single kernel rotates both.
    v is returned unchanged (copied when not inplace).
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("qkv must be (batch, seqlen, 3, heads, head_dim), got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    if qkv.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    b, s, _, h, d = qkv.shape
    if not inplace:
        qkv = qkv.clone(memory_format=torch.contiguous_format)
    qk = qkv[:, :, :2]
    try:
        qk = qk.view(b, s, 2 * h, d)
    except RuntimeError:
        raise ValueError(f"qkv's heads and 3-axis must be mergeable into one view; got strides {qkv.stride()}")
    apply_rotary(qk, cos, sin, interleaved=interleaved, inplace=True, seqlen_offsets=seqlen_offsets,
                 backend=backend)
    return qkv
