"""flash_attn_with_kvcache: attention against a preallocated KV cache (decoding), drop-in for
flash-attention 2's. Its own checks (cache shapes, lengths, that the written caches share no
memory with what the call reads) and the in-place write of the new keys / values live here; the
attention itself is phi_kernels/flash_attn.py's (its checks, backend choice and op), reading the
caches' filled prefixes. CPU decoding kernel: csrc/flash_attn/flash_decode_cpu.h.
"""
from __future__ import annotations

import torch
from torch import Tensor

from phi_kernels._checks import byte_range as _byte_range
from phi_kernels._checks import is_int as _is_int
from phi_kernels.flash_attn import _prepare, _run


def _cache_seqlens(cache_seqlens, batch: int, device) -> Tensor | int | None:
    if cache_seqlens is None or _is_int(cache_seqlens):
        return cache_seqlens
    if (not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32
            or tuple(cache_seqlens.shape) != (batch,)):
        raise ValueError(f"cache_seqlens must be an int or an int32 tensor of shape (batch,) = ({batch},), got "
                         + (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, Tensor)
                            else type(cache_seqlens).__name__))
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on q's device {device}, got {cache_seqlens.device}")
    return cache_seqlens


def _check_cache_writable(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, q: Tensor, lens) -> None:
    """torch's rules for a written tensor: no element at two indices (an expand()ed cache would
    take every row's keys in one place), no written tensor sharing memory with what is read (the
    new k / v, the other cache, q, cache_seqlens). Every tensor here is on one device (checked
    before); each one's byte range is computed once."""
    for cache_name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if torch._debug_has_internal_overlap(cache) == 1:
            raise ValueError(f"{cache_name} has elements sharing one memory location (an expand()ed or stride-0 "
                             f"tensor, strides {cache.stride()}): the new keys / values cannot be written into it")
    spans = {name: _byte_range(t) for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                                                  ("q", q), ("cache_seqlens", lens)) if isinstance(t, Tensor)}
    for written in ("k_cache", "v_cache"):
        w_begin, w_end = spans[written]
        for read, (r_begin, r_end) in spans.items():
            if read != written and (read, written) != ("k_cache", "v_cache") and w_begin < r_end and r_begin < w_end:
                raise ValueError(f"{written} shares memory with {read}: writing the new keys / values "
                                 "would overwrite what the call reads")


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                            v: Tensor | None = None, cache_seqlens: int | Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            return_softmax_lse: bool = False, *, backend: str | None = None):
    """Attention against a preallocated KV cache (decoding; drop-in for flash-attention 2's).

    q (batch, seqlen_q, heads, d); k_cache / v_cache (batch, cache_len, kv_heads, d); the optional
    new k / v (batch, seqlen_new, kv_heads, d) are written into the caches *in place* at rows
    cache_seqlens[b] : cache_seqlens[b] + seqlen_new, then row b of q attends to the first
    cache_seqlens[b] + seqlen_new keys of its cache (causal aligned to the last of them).
    cache_seqlens: an int (every row filled alike), an int32 tensor (batch,) (rows filled to
    different lengths: batched prompts of different lengths), or None (the whole cache, k/v must
    be None). Inference only: inputs that require grad are refused. Returns out, or (out, lse)
    with return_softmax_lse (lse fp32 (batch, heads, seqlen_q)).
    """
    # Everything is checked first (shapes, dtypes, devices, lengths, scalars, the backend): a
    # call that raises leaves the caches byte-identical.
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, seqlen, heads, head_dim), got "
                             + (str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__))
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values) or both be None")
    batch, cache_len = k_cache.shape[0], k_cache.shape[1]
    if k_cache.shape != v_cache.shape or batch != q.shape[0]:
        raise ValueError(f"k_cache and v_cache must have the same shape (batch = q's {q.shape[0]}), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise ValueError("flash_attn_with_kvcache is inference only: call it under torch.no_grad() "
                         "(an input requires grad)")
    new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name} (the new {'keys' if name == 'k' else 'values'}) must be a Tensor or None, "
                                 f"got {type(t).__name__}")
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k and v must be (batch, seqlen_new, kv_heads, head_dim) = ({batch}, n, "
                             f"{k_cache.shape[2]}, {k_cache.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise ValueError(f"k and v must have the caches' dtype {k_cache.dtype}, got {k.dtype} and {v.dtype}")
        for name, t in (("k", k), ("v", v)):
            if t.device != k_cache.device:
                raise ValueError(f"{name} must be on the caches' device {k_cache.device}, got {t.device}")
        new = k.shape[1]
    lens = _cache_seqlens(cache_seqlens, batch, q.device)
    if lens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required with new k / v (where to write them)")
        lens = cache_len - new
    if isinstance(lens, int):
        if not 0 <= lens <= cache_len - new:
            raise ValueError(f"cache_seqlens ({lens}) + seqlen_new ({new}) must be in [0, cache_len = {cache_len}]")
    else:
        uniform = None  # the rows' one length when they are all alike (known without tracing)
        if not torch.compiler.is_compiling():
            vals = lens.tolist()  # one small read-back
            lo, hi = (min(vals), max(vals)) if batch else (0, 0)
            if lo < 0 or hi + new > cache_len:
                raise ValueError(f"cache_seqlens + seqlen_new must be in [0, cache_len = {cache_len}], got "
                                 f"cache_seqlens in [{lo}, {hi}] and seqlen_new {new}")
            uniform = lo if lo == hi else None
    # What the kernels read: with an int length every row alike, so plain attention over the
    # filled prefix (a view; the whole cache needs none); with a tensor the whole caches and
    # each row's used length.
    if isinstance(lens, int):
        end, used = lens + new, None
        k_read, v_read = (k_cache, v_cache) if end == cache_len else (k_cache[:, :end], v_cache[:, :end])
    else:
        k_read, v_read, used = k_cache, v_cache, (lens + new if new else lens)
    # The attention's own checks and the backend choice (the prefixes have the caches' dtype,
    # strides and alignment).
    name, args = _prepare(q, k_read, v_read, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                          deterministic=False, backend=backend, names=("q", "k_cache", "v_cache"), softcap=softcap,
                          seqused_k=used)
    if k is not None and new:
        if not torch.compiler.is_compiling():
            _check_cache_writable(k_cache, v_cache, k, v, q, lens)
        start = lens if isinstance(lens, int) else uniform
        if start is not None:  # every row alike: one strided copy per cache
            k_cache[:, start:start + new] = k
            v_cache[:, start:start + new] = v
        else:  # row b's new keys go to its own offset
            rows = torch.arange(batch, device=q.device).view(batch, 1)
            cols = lens.view(batch, 1).long() + torch.arange(new, device=q.device).view(1, new)
            k_cache[rows, cols] = k
            v_cache[rows, cols] = v
    out, lse, _ = _run(name, q, k_read, v_read, args, True)
    return (out, lse) if return_softmax_lse else out
