"""Attention in plain PyTorch (materialises the score matrix): the `ref` backend of
flash_attn_func and the tests' oracle. Same semantics as the kernels:

- scores s = softmax_scale * q k^T, then softcap * tanh(s / softcap) when softcap > 0;
- key j is visible from query i (0-based within its sequence) iff
      i + sk - sq - left <= j <= i + sk - sq + right     (bottom-right aligned window)
  with left/right = infinity for -1; causal means right = 0;
- GQA: query head h reads kv head h // (heads / kv_heads);
- dropout on the probabilities, kept with probability 1 - p and scaled by 1 / (1 - p), the
  mask drawn by `dropout_keep_mask` from (seed, batch * heads + head, row, col), the same hash
  the kernels use, so the reference reproduces a kernel's mask exactly;
- a row with no visible key outputs 0 and has LSE = +inf (so exp(s - lse) = 0 in a backward);
- non-finite inputs (forward): a key a row cannot see never affects that row, whatever its k
  and v hold (inf and NaN included); a NaN the row sees, in its q or in the k of a visible key,
  makes its whole output row and its LSE NaN; out[row, c] is the IEEE sum over the visible keys
  j of p[row, j] * v[j, c], so a NaN v[j, c] makes it NaN, an inf v[j, c] makes it inf of that
  sign, or NaN where p[row, j] is 0 (underflow, dropout) or both signs meet (flash_math.h states
  the same rule for the kernels; tests/test_bad_input_kernels.py holds every backend to it).
  Dropout does not hide a key: a dropped visible key still counts as seen.
- non-finite inputs (backward): unspecified beyond this: a NaN in v can reach dq of rows that
  cannot see its key and dk of other keys (dO V^T is formed for every (row, key) pair the kernels
  visit, and 0 * NaN = NaN), and dv stays finite; on small shapes every backend gives this
  autograd's NaN pattern (tested), on longer ones the kernels skip tiles no row of which sees
  the key and this dense autograd does not. For inf in v, or NaN / inf in q or k, the kernels'
  dk / dv patterns differ from this autograd's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_M = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finalizer (xor-shift-multiply), in int64 arithmetic masked to 32 bits."""
    x = x & _M
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M
    return x ^ (x >> 16)


def dropout_keep_mask(seed: int, bh: Tensor, rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """Keep mask (True = kept) for (batch*head, row, col) index tensors that broadcast together.
    Kernels compute the same: h = mix(mix(mix(seed ^ bh * 0x9E3779B9) ^ row) ^ col), keep iff
    (h >> 8) / 2^24 >= p."""
    h = _mix32((seed ^ (bh.long() * 0x9E3779B9)) & _M)
    h = _mix32(h ^ rows.long())
    h = _mix32(h ^ cols.long())
    return (h >> 8).double() / 2.0**24 >= p


def _visible(sq: int, sk: int, window: tuple[int, int], device) -> Tensor:
    i = torch.arange(sq, device=device).view(sq, 1)
    j = torch.arange(sk, device=device).view(1, sk)
    left, right = window
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i + sk - sq - left
    if right >= 0:
        ok &= j <= i + sk - sq + right
    return ok


def _attention(q, k, v, scale, window, softcap, dropout_p, seed, bh_offset, compute):
    """q (B, sq, H, D), k/v (B, sk, Hkv, D) -> out (B, sq, H, D), lse (B, H, sq)."""
    b, sq, h, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qf = q.to(compute).transpose(1, 2)  # (B, H, sq, D)
    kf = k.to(compute).transpose(1, 2)  # (B, Hkv, sk, D)
    vf = v.to(compute).transpose(1, 2)
    if hkv != h:  # GQA: query head i reads kv head i // (H / Hkv)
        kf = kf.repeat_interleave(h // hkv, 1)
        vf = vf.repeat_interleave(h // hkv, 1)
    s = scale * qf @ kf.transpose(-1, -2)  # (B, H, sq, sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window
    # Mask only when some row misses some key (decoding with sq = 1 under causal sees every key).
    visible = None
    if 0 <= right < sq - 1 or 0 <= left < sk - 1:
        visible = _visible(sq, sk, window, q.device)
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, sq); -inf for empty rows
    empty = torch.isneginf(lse)
    p = torch.exp(s - lse.masked_fill(empty, 0).unsqueeze(-1)).masked_fill(empty.unsqueeze(-1), 0)
    if dropout_p > 0:
        bh = bh_offset + torch.arange(b * h, device=q.device).view(b, h, 1, 1)
        keep = dropout_keep_mask(seed, bh, torch.arange(sq, device=q.device).view(1, 1, sq, 1),
                                 torch.arange(sk, device=q.device).view(1, 1, 1, sk), dropout_p)
        p = torch.where(keep, p / (1 - dropout_p), torch.zeros((), dtype=p.dtype, device=p.device))
    # A masked key has p = 0, but 0 * NaN = NaN: with a non-finite v, sum each row's visible
    # keys only (materialises (sq, sk, d); rare). Not under torch.compile (a data-dependent branch).
    if visible is None or torch.compiler.is_compiling() or bool(torch.isfinite(vf).all()):
        out = p @ vf
    else:
        out = torch.where(visible[..., None], p[..., None] * vf[:, :, None], 0).sum(-2)
    out = out.transpose(1, 2)  # (B, sq, H, D)
    return out, lse.masked_fill(empty, math.inf)


def flash_attn_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: float,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    seed: int = 0,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    seqused_k: Tensor | None = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Returns (out in q's dtype, lse fp32, fp64 for fp64 inputs): lse (batch, heads, seqlen_q),
    or (heads, total_q) for packed inputs. Math in fp32 (fp64 for fp64 inputs) when upcast, else in q's dtype
    (what a plain low-precision implementation would do: the error yardstick of the tests).
    seqused_k (batch,): sequence b sees only its first seqused_k[b] keys (a KV cache filled to
    different lengths), the masks aligned to those keys."""
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    heads = q.shape[-2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens_q is None and seqused_k is None:
        out, lse = _attention(q, k, v, softmax_scale, window_size, softcap, dropout_p, seed, 0, compute)
        return out.to(q.dtype), lse.to(lse_dtype)
    if cu_seqlens_q is None:  # dense with per-sequence key counts: one sequence at a time
        used = seqused_k.tolist()
        outs, lses = zip(*(_attention(q[b:b + 1], k[b:b + 1, :used[b]], v[b:b + 1, :used[b]], softmax_scale,
                                      window_size, softcap, dropout_p, seed, b * heads, compute)
                           for b in range(q.shape[0])))
        return torch.cat(outs).to(q.dtype), torch.cat(lses).to(lse_dtype)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if seqused_k is not None:  # only the first seqused_k[b] keys of each packed sequence
        ck_end = [ck[b] + u for b, u in enumerate(seqused_k.tolist())]
    else:
        ck_end = ck[1:]
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse = torch.full((heads, q.shape[0]), math.inf, dtype=lse_dtype, device=q.device)
    for b in range(len(cq) - 1):
        o, l_ = _attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck_end[b]], v[None, ck[b]:ck_end[b]],
                           softmax_scale, window_size, softcap, dropout_p, seed, b * heads, compute)
        out[cq[b]:cq[b + 1]] = o[0]
        lse[:, cq[b]:cq[b + 1]] = l_[0].to(lse_dtype)
    return out.to(q.dtype), lse
