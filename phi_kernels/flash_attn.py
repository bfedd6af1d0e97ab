"""Flash attention: public API (drop-in for flash-attention 2's), validation, op registration,
autograd and backend dispatch.

    out = flash_attn_func(q, k, v, causal=True)                     # q (b, sq, h, d), k/v (b, sk, h_kv, d)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)   # packed (total, h, d)
    out = flash_attn_qkvpacked_func(qkv, causal=True)               # qkv (b, s, 3, h, d)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)  # lse fp32 (b, h, sq)

Semantics (shared with the oracle phi_kernels/reference/flash_attn.py): causal masks are
aligned to the bottom-right corner when seqlen_q != seqlen_k (flash-attention >= 2.1; what
KV-cache decoding needs); window_size=(left, right) a sliding window, -1 unbounded; softcap>0
caps scores with softcap * tanh(s / softcap); GQA/MQA when heads is a multiple of kv_heads;
dropout drawn from a seed taken from torch's default generator, so torch.manual_seed makes it
reproducible and the forward and backward see the same mask. A row that sees no key returns 0
(and lse +inf). Memory is linear in the sequence length on the triton and cuda backends.

Non-finite inputs (flash_math.h; tests/test_bad_input_kernels.py): a key a row cannot see (causal,
window, another packed sequence, a KV-cache slot past cache_seqlens) never affects that row,
whatever its k and v hold; a NaN the row sees, in its q or in the k of a visible key, makes the
whole output row and its lse NaN; out[row, c] is the IEEE sum over the visible keys j of p[row, j]
* v[j, c]: NaN for a NaN v[j, c], inf of its sign for an infinite one, NaN where p is 0 (underflow,
dropout) or both signs meet. Every backend follows it. Gradients with non-finite inputs are
unspecified.

Bad arguments raise ValueError naming them before anything runs or is written: softcap must be
finite and >= 0, softmax_scale finite and > 0 (both also as float32), dropout_p in [0, 1),
window_size two ints >= -1; cu_seqlens start at 0, are non-decreasing and end at the packed row
count; max_seqlen is an int in [0, 2**31 - 1] not below the longest sequence (any value above it
is fine: the kernels are given the longest, read back from cu_seqlens). flash_attn_with_kvcache
(decoding against a KV cache) is in phi_kernels/flash_attn_kvcache.py, on top of this file's
_prepare / _run; it checks every argument and the backend before it writes into the caches.

Backends: "triton" (phi_kernels/triton/flash_attn_fwd.py, _bwd.py), "cuda" (csrc/flash_attn:
head_dim 64/128, fp16/bf16, 16-byte aligned rows; its backward accumulates dq with atomics,
so deterministic=True picks another backend), "cuda-emu" (the same CUDA kernels run on CPU
tensors by the SIMT emulator, with the same restrictions; slow, for testing, only when asked
for), "cpu" (csrc/flash_attn/flash_attn_cpu.cpp: every option, deterministic) and "ref" (the
oracle; it materialises the attention matrix and autograd differentiates it). The kernel
backends are registered as torch.library custom ops phi_kernels::flash_attn_forward /
flash_attn_backward with fake implementations and autograd, so torch.compile traces them; both
call the C++ out-variant ops flash_attn_forward_out / flash_attn_backward_out of phi_kernels._C
for "cuda" and "cpu", and their phi_kernels_emu twins (same schemas) of phi_kernels._simt for
"cuda-emu", or the Triton launchers.

Options: the kernels' options (cu_seqlens, max_seqlen, scale, window, softcap, dropout, seed,
seqused_k) travel as one FlashAttnArgs (phi_kernels/_op_args.py), positional only at the
torch.library boundary, in the order of PHI_FLASH_ATTN_OPTIONS (csrc/op_schemas.h). A new
option is added to the schema fragment, FlashAttnArgs, Flash_params and make_params
(csrc/flash_attn/flash.h, flash_attn_bind.h), the kernels (CPU, CUDA, Triton, the reference),
the public signatures below and the tests.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import os

import torch
from torch import Tensor

from phi_kernels import _extension
from phi_kernels._backends import ENV_VAR as BACKEND_ENV_VAR
from phi_kernels._backends import cpp_ops, resolve_backend
from phi_kernels._op_args import OpArgs
from phi_kernels._checks import FP32_MAX as _FP32_MAX
from phi_kernels._checks import INT32_MAX as _INT32_MAX
from phi_kernels._checks import check_cu_seqlens as _check_cu_seqlens
from phi_kernels._checks import cu_seqlens_lengths as _cu_seqlens_lengths
from phi_kernels._checks import is_int as _is_int
from phi_kernels.reference.flash_attn import flash_attn_ref

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- validation


_FP32_HALF_TINY = 7.006492321624085e-46  # half the smallest float32 subnormal: rounds to 0


def _real(x) -> bool:
    """A real number that is not a bool (the fast path first: this runs on every decoding step)."""
    return type(x) is float or type(x) is int or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def _check_scalars(dropout_p, window_size, softcap, softmax_scale) -> None:
    """The non-tensor arguments: finite numbers in range (ValueError naming the argument). The
    kernels take softcap and softmax_scale as float32, so they must be finite there too (and
    softmax_scale must not round to 0)."""
    if not _real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not _real(softcap) or not 0.0 <= softcap <= _FP32_MAX:  # NaN fails every comparison
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap!r}")
    if softmax_scale is not None and (not _real(softmax_scale) or not _FP32_HALF_TINY < softmax_scale <= _FP32_MAX):
        raise ValueError(f"softmax_scale must be a finite number > 0 (float32: in [1.4e-45, 3.4e38]), "
                         f"got {softmax_scale!r}")
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int \
            and type(window_size[1]) is int and -1 <= window_size[0] <= _INT32_MAX and -1 <= window_size[1] <= _INT32_MAX:
        return  # the common case, without the generality below
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(not _is_int(w) or not -1 <= w <= _INT32_MAX for w in window_size)):
        raise ValueError(f"window_size must be (left, right) ints in [-1, 2**31 - 1] (-1 = unbounded), "
                         f"got {window_size!r}")


def _dense_ok(q, k, v) -> bool:
    """Whether _check's tensor checks all pass for the dense layout: one expression, so a call
    that passes costs a few attribute reads (decoding makes one every step); a call that fails
    goes through _check's checks in order, for the message."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return False
    dtype, device, shape = q.dtype, q.device, k.shape
    if not (dtype in _DTYPES and k.dtype == dtype and v.dtype == dtype and k.device == device and v.device == device
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and q.dim() == 4 and len(shape) == 4 and v.shape == shape and shape[0] == q.shape[0]):
        return False
    head_dim, heads, kv_heads = q.shape[3], q.shape[2], shape[2]
    return shape[3] == head_dim and head_dim % 8 == 0 and 8 <= head_dim <= 256 and kv_heads != 0 \
        and heads % kv_heads == 0


def _scalars_ok(dropout_p, window_size, softcap, softmax_scale) -> bool:
    """Whether _check_scalars passes, for the defaults and plain floats (anything else: False,
    and _check_scalars decides)."""
    return (type(dropout_p) is float and 0.0 <= dropout_p < 1.0 and type(softcap) is float
            and 0.0 <= softcap <= _FP32_MAX
            and (softmax_scale is None or type(softmax_scale) is float and _FP32_HALF_TINY < softmax_scale <= _FP32_MAX)
            and type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int
            and type(window_size[1]) is int and -1 <= window_size[0] <= _INT32_MAX
            and -1 <= window_size[1] <= _INT32_MAX)


def _check(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, window_size, softcap, softmax_scale,
           names=("q", "k", "v")) -> tuple:
    """Raise ValueError naming the bad argument. Returns the (max_seqlen_q, max_seqlen_k) the
    kernels should use with cu_seqlens: the longest sequences, read back from cu_seqlens (the
    given values under torch.compile, where nothing is read back). flash-attention accepts any
    max_seqlen >= the longest sequence; sizing the launch by the longest makes a max_seqlen far
    above it (2**31 - 1) cost nothing instead of a huge grid or allocation. names: what the
    caller calls q, k and v (flash_attn_with_kvcache: q, k_cache, v_cache)."""
    if cu_q is None and _dense_ok(q, k, v) and _scalars_ok(dropout_p, window_size, softcap, softmax_scale):
        return max_q, max_k  # every check below passes (the common call, without building messages)
    nq, nk, nv = names
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (last dim), got strides {t.stride()}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{nq}, {nk}, {nv} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    nd = 3 if cu_q is not None else 4
    layout = "(total, heads, head_dim)" if nd == 3 else "(batch, seqlen, heads, head_dim)"
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if t.dim() != nd:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if nd == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"{nq} and {nk} must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    head_dim, heads, kv_heads = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{nk}'s head_dim must equal {nq}'s ({head_dim}), got {k.shape[-1]}")
    if head_dim % 8 or not 8 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, 256], got {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    _check_scalars(dropout_p, window_size, softcap, softmax_scale)
    if cu_q is None:
        return max_q, max_k
    longest = []
    for name, cu, total, mx_name, mx in (("cu_seqlens_q", cu_q, q.shape[0], "max_seqlen_q", max_q),
                                         ("cu_seqlens_k", cu_k, k.shape[0], "max_seqlen_k", max_k)):
        _check_cu_seqlens(cu, name, q, "q")
        if not _is_int(mx) or not 0 <= mx <= _INT32_MAX:
            raise ValueError(f"{mx_name} must be an int in [0, 2**31 - 1], got {mx!r}")
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_q.numel()} and {cu_k.numel()}")
    if torch.compiler.is_compiling():
        return max_q, max_k
    for name, cu, total, mx_name, mx in (("cu_seqlens_q", cu_q, q.shape[0], "max_seqlen_q", max_q),
                                         ("cu_seqlens_k", cu_k, k.shape[0], "max_seqlen_k", max_k)):
        lengths = _cu_seqlens_lengths(cu, name, total, "the packed length")
        if int(lengths.max()) > mx:
            raise ValueError(f"{mx_name} {mx} is below the longest sequence in {name} ({int(lengths.max())})")
        longest.append(int(lengths.max()))
    return longest[0], longest[1]


def _window(causal: bool, window_size) -> tuple[int, int]:
    """causal is the window (left, 0): no key right of the (bottom-right aligned) diagonal."""
    left, right = window_size
    return (left, 0) if causal else (left, right)


@functools.lru_cache(maxsize=None)
def _plan_smem(head_dim: int, backward: bool) -> int:
    """Dynamic shared memory per block of the CUDA kernel for head_dim (flash_plan.h, through
    the host-side plan op; it depends only on the instantiation)."""
    q = torch.empty(1, 64, 1, head_dim, dtype=torch.float16)
    lse = torch.empty(1, 1, 64)
    options = FlashAttnArgs(max_seqlen_q=0, max_seqlen_k=0, softmax_scale=1.0).positional()
    return int(torch.ops.phi_kernels.flash_attn_cuda_plan(q, q, q, *options, q, lse, backward)[-1])


@functools.lru_cache(maxsize=None)
def _gpu_smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def _smem_limit(device: torch.device, emulated: bool) -> int:
    """Opt-in shared memory per block: of this GPU, or of the emulated arch (PHI_SIMT_ARCH)."""
    if emulated:
        return int(torch.ops.phi_kernels_emu.emu_max_dynamic_smem())
    return _gpu_smem_optin(device.index if device.index is not None else torch.cuda.current_device())


def _why_not_cuda(q: Tensor, k: Tensor, v: Tensor, deterministic: bool, emulated: bool = False,
                  backward: bool = False) -> str | None:
    """Why the CUDA kernels cannot run this call (None if they can). emulated: for "cuda-emu",
    the same kernels under the SIMT emulator, which refuses exactly what they refuse."""
    if emulated:
        if not _extension.emu_has_kernel("flash_attn_forward_out"):
            return "phi_kernels._simt has no emulated flash attention kernels (rebuild it)"
    elif not _extension.has_kernel("flash_attn_forward_out", "CUDA"):
        return "phi_kernels._C has no CUDA flash attention kernels"
    if q.shape[-1] not in (64, 128):
        return f"head_dim {q.shape[-1]} (the CUDA kernels are compiled for 64 and 128)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the CUDA kernels take float16 and bfloat16)"
    for name, t in (("q", q), ("k", k), ("v", v)):  # cp.async copies 16-byte chunks
        if t.storage_offset() % 8 or any(s % 8 for s in t.stride()[:-1]):
            return f"{name} rows are not 16-byte aligned (strides {t.stride()})"
    if deterministic:
        return "deterministic=True (the CUDA backward accumulates dq with atomics)"
    # The sm_80 build also runs on sm_86 / sm_89 parts (99 KiB per block); checked eagerly only
    # (under torch.compile the C++ launch check still refuses with the same reason).
    if _extension.load_error() is None and not torch.compiler.is_compiling():
        limit = _smem_limit(q.device, emulated)
        for needed, what in ((_plan_smem(q.shape[-1], False), "forward"),
                             (_plan_smem(q.shape[-1], True) if backward else 0, "backward")):
            if needed > limit:
                return (f"the head_dim {q.shape[-1]} {what} needs {needed} bytes of shared memory per block, "
                        f"this {'emulated ' if emulated else ''}GPU allows {limit}")
    return None


def _why_not_cpu() -> str | None:
    if not _extension.has_kernel("flash_attn_forward_out", "CPU"):
        return "phi_kernels._C has no CPU flash attention kernels (rebuild it)"
    return None


def _cpu_backend(q: Tensor, requested: str | None) -> str | None:
    """The backend name "cpu" where resolve_backend would choose it: CPU tensors, the kernels
    loaded, and cpu asked for (backend= or PHI_KERNELS_BACKEND) or nothing asked for (cpu comes
    first then). None: ask resolve_backend, which also says why a request cannot be honoured.
    It describes every backend's status to choose one, which cost a decoding step of a small
    model as much as its attention."""
    if not q.is_cpu:
        return None
    if requested is None:
        requested = os.environ.get(BACKEND_ENV_VAR) or None
    if (requested is None or requested == "cpu") and _extension.load_error() is None and _why_not_cpu() is None:
        return "cpu"
    return None


# --------------------------------------------------------------------------- ops


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlashAttnArgs(OpArgs):
    """What the kernels are given besides q, k, v and the tensors they write: the options of
    PHI_FLASH_ATTN_OPTIONS in csrc/op_schemas.h, same names, same order (phi_kernels/_op_args.py).
    Built once per call by _prepare from the public arguments (causal becomes window_right = 0,
    softmax_scale gets its default, max_seqlen the longest sequence) and completed by _run (the
    dropout seed; the dense shapes)."""

    cu_seqlens_q: Tensor | None = None  # (batch + 1,) int32: the packed layout; None: dense
    cu_seqlens_k: Tensor | None = None
    seqused_k: Tensor | None = None  # (batch,) int32, forward only: sequence b uses its first seqused_k[b] keys
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    window_left: int = -1  # -1 unbounded; causal is window_right = 0
    window_right: int = -1
    softcap: float = 0.0  # 0 = off
    dropout_p: float = 0.0
    seed: int = 0  # of the dropout mask


# args.positional() by one attrgetter, for the eager kernel calls (every decoding step makes
# one; torch.compile traces positional() itself, not this).
_positional = operator.attrgetter(*FlashAttnArgs.names())


def _empty_lse(q: Tensor, varlen: bool) -> Tensor:
    if varlen:
        return torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, args: FlashAttnArgs, backend: str) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = _empty_lse(q, args.cu_seqlens_q is not None)
    if backend in ("cuda", "cuda-emu", "cpu"):  # causal is carried by the window: window_right == 0
        cpp_ops(backend).flash_attn_forward_out(q, k, v, *_positional(args), out, lse)
    else:
        from phi_kernels.triton.flash_attn_fwd import flash_attn_fwd_triton

        flash_attn_fwd_triton(q, k, v, args, out, lse)
    return out, lse


def _backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, args: FlashAttnArgs,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    if backend in ("cuda", "cuda-emu", "cpu"):
        cpp_ops(backend).flash_attn_backward_out(dout, q, k, v, out, lse, *args.positional(), dq, dk, dv)
    else:
        from phi_kernels.triton.flash_attn_bwd import flash_attn_bwd_triton

        flash_attn_bwd_triton(dout, q, k, v, out, lse, args, dq, dk, dv)
    return dq, dk, dv


# The torch.library boundary: the custom ops take the FlashAttnArgs fields positionally (their
# schemas are written from the fields), then the backend name.
_N_OPTIONS = len(FlashAttnArgs.names())


def _unpack(flat: tuple) -> tuple[FlashAttnArgs, str]:
    return FlashAttnArgs.from_positional(flat[:_N_OPTIONS]), flat[_N_OPTIONS]


_forward = torch.library.custom_op(
    "phi_kernels::flash_attn_forward", lambda q, k, v, *flat: _forward_impl(q, k, v, *_unpack(flat)),
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, {FlashAttnArgs.schema()}, str backend) -> (Tensor, Tensor)")
_backward = torch.library.custom_op(
    "phi_kernels::flash_attn_backward",
    lambda dout, q, k, v, out, lse, *flat: _backward_impl(dout, q, k, v, out, lse, *_unpack(flat)),
    mutates_args=(),
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {FlashAttnArgs.schema()}, "
           "str backend) -> (Tensor, Tensor, Tensor)")


@_forward.register_fake
def _(q, k, v, *flat):
    args, _ = _unpack(flat)
    return torch.empty_like(q, memory_format=torch.contiguous_format), _empty_lse(q, args.cu_seqlens_q is not None)


@_backward.register_fake
def _(dout, q, k, v, out, lse, *flat):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, *flat = inputs
    args, backend = _unpack(flat)
    if args.seqused_k is not None:  # only flash_attn_with_kvcache passes it, and it refuses gradients
        raise NotImplementedError("flash attention with seqused_k has no backward (inference only)")
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *args.tensors())
    ctx.args = args.without_tensors()
    ctx.backend = backend


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    args = ctx.args.with_tensors(tensors)
    dq, dk, dv = _backward(dout, q, k, v, out, lse, *args.positional(), ctx.backend)
    return (dq, dk, dv) + (None,) * (_N_OPTIONS + 1)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def _prepare(q, k, v, *, causal: bool, window_size, softmax_scale, deterministic: bool, backend: str | None,
             max_seqlen_q=None, max_seqlen_k=None, names=("q", "k", "v"), **options) -> tuple[str, FlashAttnArgs]:
    """Every check and the backend choice, with no side effect: (backend name, FlashAttnArgs)
    for _run. options: the FlashAttnArgs fields the public functions pass as they are
    (cu_seqlens_q / _k, softcap, dropout_p). flash_attn_with_kvcache calls it before writing
    into the caches, so a call that fails leaves them untouched."""
    cu_q, cu_k = options.get("cu_seqlens_q"), options.get("cu_seqlens_k")
    softcap, dropout_p = options.get("softcap", 0.0), options.get("dropout_p", 0.0)
    max_q, max_k = _check(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, dropout_p, window_size, softcap,
                          softmax_scale, names)
    if cu_q is None:  # dense: the shapes (_run sets those of the tensors it is given)
        max_q, max_k = q.shape[1], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    wl, wr = _window(causal, window_size)
    name = _cpu_backend(q, backend)
    if name is None:
        backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        name = resolve_backend("flash_attn", q.device, backend,
                               supported=("cuda", "cuda-emu", "triton", "cpu", "ref"),
                               why_not=lambda n: (_why_not_cuda(q, k, v, deterministic, emulated=n == "cuda-emu",
                                                                backward=backward)
                                                  if n in ("cuda", "cuda-emu")
                                                  else _why_not_cpu() if n == "cpu" else None))
    options.update(softcap=float(softcap), dropout_p=float(dropout_p))
    return name, FlashAttnArgs(max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=float(scale), window_left=wl,
                               window_right=wr, **options)


def _run(name: str, q, k, v, args: FlashAttnArgs, return_attn_probs: bool):
    """The call, after _prepare."""
    # The dropout seed comes from torch's default generator: torch.manual_seed reproduces it.
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if args.dropout_p > 0 else 0
    # Dense: the shapes of what is passed (what _prepare was given, unless a caller passes other views).
    if args.cu_seqlens_q is None and (args.max_seqlen_q != q.shape[1] or args.max_seqlen_k != k.shape[1] or seed):
        args = dataclasses.replace(args, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], seed=seed)
    elif seed:
        args = dataclasses.replace(args, seed=seed)
    if name == "ref":  # plain PyTorch: autograd differentiates it directly
        out, lse = flash_attn_ref(q, k, v, softmax_scale=args.softmax_scale,
                                  window_size=(args.window_left, args.window_right), softcap=args.softcap,
                                  dropout_p=args.dropout_p, seed=args.seed, cu_seqlens_q=args.cu_seqlens_q,
                                  cu_seqlens_k=args.cu_seqlens_k, seqused_k=args.seqused_k)
        return (out, lse, None) if return_attn_probs else out
    # Without autograd or tracing (decoding, evaluation) the kernels are called directly: the
    # custom op's dispatch costs more than a decoding step's attention on a small model.
    needs_op = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_op or torch.compiler.is_compiling():
        out, lse = _forward(q, k, v, *args.positional(), name)
    else:
        out, lse = _forward_impl(q, k, v, args, name)
    # The triton and cpu backwards are deterministic (no atomics); cuda and cuda-emu are excluded
    # above when asked.
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    deterministic: bool = False, return_attn_probs: bool = False, *, backend: str | None = None):
    """softmax(q k^T * scale [masked]) v for q (batch, seqlen_q, heads, d), k/v (batch, seqlen_k,
    kv_heads, d). softmax_scale defaults to 1/sqrt(d). With return_attn_probs, returns
    (out, lse, None): lse is the fp32 log-sum-exp per row (batch, heads, seqlen_q); the
    probabilities themselves are never materialised (the third value is None)."""
    name, args = _prepare(q, k, v, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                          deterministic=deterministic, backend=backend, softcap=softcap, dropout_p=dropout_p)
    return _run(name, q, k, v, args, return_attn_probs)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           deterministic: bool = False, return_attn_probs: bool = False, *,
                           backend: str | None = None):
    """Packed variable-length sequences: q (total_q, heads, d), k/v (total_k, kv_heads, d),
    sequence b at rows cu_seqlens[b]:cu_seqlens[b+1] (int32). No token attends across
    sequences. lse (with return_attn_probs) is (heads, total_q)."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k are required (int32 tensors of shape (batch + 1,))")
    name, args = _prepare(q, k, v, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                          deterministic=deterministic, backend=backend, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                          softcap=softcap, dropout_p=dropout_p)
    return _run(name, q, k, v, args, return_attn_probs)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              deterministic: bool = False, return_attn_probs: bool = False, *,
                              backend: str | None = None):
    """qkv (batch, seqlen, 3, heads, d): q, k and v are strided views of it (no copies)."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("qkv must be (batch, seqlen, 3, heads, head_dim), got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p=dropout_p, softmax_scale=softmax_scale,
                           causal=causal, window_size=window_size, softcap=softcap, deterministic=deterministic,
                           return_attn_probs=return_attn_probs, backend=backend)
