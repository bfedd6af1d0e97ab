"""Flash attention forward, Triton kernel (FlashAttention-2 algorithm).

Contract (validated by phi_kernels/flash_attn.py):
  q (batch, seqlen_q, heads, d) and k, v (batch, seqlen_k, kv_heads, d), or packed
  (total, heads, d) with int32 cu_seqlens_q / cu_seqlens_k (batch + 1); head_dim d a multiple
  of 8 up to 256 (tiles use the next power of two, masked); any strides with d contiguous.
  out like q; lse fp32 (batch, heads, seqlen_q), or (heads, total_q) packed. Optional int32
  seqused_k (batch,): sequence b uses only its first seqused_k[b] keys (KV-cache decoding).
Semantics as phi_kernels/reference/flash_attn.py: scale, optional tanh softcap, bottom-right
aligned causal/sliding window, GQA (head h reads kv head h // group), dropout from a seed with
the reference's hash, empty rows -> out 0, lse +inf.
Grid: (cdiv(max_seqlen_q, BLOCK_M), batch * heads). A program owns BLOCK_M query rows of one
head, streams K/V in BLOCK_N tiles and keeps the online softmax (running max m, sum l, acc) in
fp32 registers; exponentials in base 2 (scale folded with log2 e). The key range is split into
tiles that every row sees entirely (no mask arithmetic) and boundary tiles (masked).
Non-finite V (flash_math.h's rule: a key a row cannot see never affects it): a masked key's
p = 0 does not hide an inf / NaN v (0 * NaN = NaN), so boundary tiles count V's inf / NaN as 0,
and only when there were some does a second pass (_nonfinite_v_patch) add what they contribute
to the rows that see them; a finite V costs the boundary tiles one check.
"""
from __future__ import annotations

import triton
import triton.language as tl

from phi_kernels.triton._interp import load_as_fp32, to_storage

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); globals in kernels must be constexpr


@triton.jit
def _mix32(x):
    # uint32 constants, so products wrap mod 2^32 (an int literal above 2^31 would be int64).
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def dropout_keep(seed, bh, rows, cols, p):
    """Same hash as reference.flash_attn.dropout_keep_mask, in uint32 arithmetic (wraps)."""
    h = _mix32(seed.to(tl.uint32) ^ (bh.to(tl.uint32) * tl.full([], 0x9E3779B9, tl.uint32)))
    h = _mix32(h ^ rows.to(tl.uint32)[:, None])
    h = _mix32(h ^ cols.to(tl.uint32)[None, :])
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p


@triton.jit
def load_tile(ptr, rows, cols, stride_row, n_rows, n_cols, BF16_AS_INT16: tl.constexpr):
    """[len(rows), len(cols)] tile of a (row, col) matrix with unit col stride, zero-padded."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return load_as_fp32(ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], mask, BF16_AS_INT16)


@triton.jit
def seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first row of sequence b in q, its length; the same for k). 0 for the padded layout."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def scores(q, k, qk_scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores in log2 units: log2(e) * softcap(scale * q k^T). Returns (s2, tanh) (tanh for the
    softcap derivative; 0 without softcap)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1 (libdevice tanh is unavailable in the interpreter)
        t = 2.0 * tl.sigmoid(2.0 * s * (qk_scale / softcap)) - 1.0
        return (softcap * 1.4426950408889634) * t, t  # log2(e) literal: scalar * constexpr fails when interpreted
    return s * (qk_scale * 1.4426950408889634), s * 0.0


@triton.jit
def visible(rows, cols, q_len, k_len, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Mask of keys visible from queries (bottom-right aligned window), inside both lengths."""
    diag = rows[:, None] + (k_len - q_len)
    ok = (cols[None, :] < k_len) & (rows[:, None] < q_len)
    if HAS_LEFT:
        ok = ok & (cols[None, :] >= diag - window_left)
    if HAS_RIGHT:
        ok = ok & (cols[None, :] <= diag + window_right)
    return ok


@triton.jit
def key_range(m0, m1, q_len, k_len, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """For the real query rows [m0, m1) of a tile: key tiles [lo, hi) that some row sees, and
    the tiles [full_lo, full_hi) inside it that every row sees entirely (no masking needed).
    Returned as tile indices, lo <= full_lo <= full_hi <= hi."""
    off = k_len - q_len  # bottom-right alignment: row i's diagonal is key i + off
    lo = 0
    hi = k_len
    full_lo = 0
    full_hi = k_len
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - window_left, 0)
        full_lo = tl.maximum(m1 - 1 + off - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(m1 - 1 + off + window_right + 1, k_len)
        full_hi = tl.minimum(m0 + off + window_right + 1, k_len)
    lo_blk = lo // BLOCK_N
    hi_blk = tl.maximum(tl.cdiv(tl.maximum(hi, 0), BLOCK_N), lo_blk)
    full_lo_blk = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N), lo_blk), hi_blk)
    full_hi_blk = tl.maximum(tl.minimum(tl.maximum(full_hi, 0) // BLOCK_N, hi_blk), full_lo_blk)
    return lo_blk, full_lo_blk, full_hi_blk, hi_blk


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, offs_d, head_dim, q_len, k_len,
               blk_start, blk_end, qk_scale, softcap, window_left, window_right, seed, bh, dropout_p,
               MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_INT16: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The online softmax over key tiles [blk_start, blk_end). MASKED tiles (some row misses some
    key): a masked key's p = 0 does not hide a non-finite v (0 * inf = 0 * NaN = NaN), so their
    inf / NaN elements of V count as 0 here; _masked_v_nonfinite tells the kernel afterwards
    whether there were any, and _nonfinite_v_patch adds what they contribute to the rows that
    see them (outside this loop: the compiled kernel is at its register limit here)."""
    for blk in range(blk_start, blk_end):
        cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_tile(K, cols, offs_d, stride_kn, k_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        v = load_tile(V, cols, offs_d, stride_vn, k_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        if MASKED:
            v = tl.where((v - v) != 0.0, 0.0, v).to(DOT_DTYPE)  # inf - inf, NaN - NaN: NaN; finite: 0
        s, _t = scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
        if MASKED:
            s = tl.where(visible(rows, cols, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, bh, rows, cols, dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _masked_v_nonfinite(V, stride_vn, offs_d, head_dim, k_len, blk_start, blk_end, BF16_AS_INT16: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Whether V has an inf / NaN in key tiles [blk_start, blk_end) (int32 0 / 1)."""
    bad = tl.zeros([], tl.int32)
    for blk in range(blk_start, blk_end):
        cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        v = load_tile(V, cols, offs_d, stride_vn, k_len, head_dim, BF16_AS_INT16)
        bad = tl.maximum(bad, tl.max(((v - v) != 0.0).to(tl.int32)))
    return bad


@triton.jit
def _nonfinite_v_patch(patch, m_i, q, K, V, stride_kn, stride_vn, rows, offs_d, head_dim, q_len, k_len, qk_scale,
                       softcap, window_left, window_right, seed, bh, dropout_p, SOFTCAP: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
                       PRECISION: tl.constexpr, BF16_AS_INT16: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_DTYPE: tl.constexpr):
    """patch += what the inf / NaN elements of V add to the output: per (row, column), over the
    keys j the row sees, the IEEE sum of p * v[j, c], p relative to the row's final max: NaN for
    a NaN v, or for an inf v where p is 0 (underflow, dropout), else inf of v's sign, NaN where
    both signs meet. Rare (run only when _fwd_tiles zeroed some in a masked tile). It walks every
    key, 16 at a time (small tiles, nothing the main loop would have to keep alive: the compiled
    kernel is at its register limit); for keys of the unmasked tiles it repeats what the main
    product already added, which IEEE addition absorbs (inf + inf = inf, NaN + x = NaN)."""
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    for g in range(0, k_len, 16):  # 16 keys at a time: small tiles
        keys = g + tl.arange(0, 16)
        v = load_tile(V, keys, offs_d, stride_vn, k_len, head_dim, BF16_AS_INT16)  # (16, BLOCK_D) fp32
        is_pos, is_neg, is_nan = v == float("inf"), v == float("-inf"), v != v
        if tl.max((is_pos | is_neg | is_nan).to(tl.int32)) > 0:
            k = load_tile(K, keys, offs_d, stride_kn, k_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
            s, _t = scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)  # (BLOCK_M, 16)
            sees = visible(rows, keys, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(sees, tl.exp2(s - m_safe[:, None]), 0.0)
            if DROPOUT:
                p = tl.where(dropout_keep(seed, bh, rows, keys, dropout_p), p, 0.0)
            # One product of weighted 0/1 indicators counts, per (row, column), +inf (1)
            # and -inf (32) at keys seen with p != 0, and a NaN seen (1024) or any inf /
            # NaN at a visible key whose p is 0 (1024 x the weight): below 1024 it is
            # exact (at most 16 of each sign); 1024 or more means a NaN arises.
            a = tl.where(sees & (p != 0.0), 1.0, tl.where(sees, 1024.0, 0.0)).to(DOT_DTYPE)
            w = tl.where(is_pos, 1.0, tl.where(is_neg, 32.0, tl.where(is_nan, 1024.0, 0.0))).to(DOT_DTYPE)
            counts = tl.dot(a, w, input_precision=PRECISION)
            n_neg = tl.floor(counts * (1.0 / 32.0))
            n_pos = counts - 32.0 * n_neg
            extra = tl.where(n_pos > 0, float("inf"), 0.0) + tl.where(n_neg > 0, float("-inf"), 0.0)
            patch = patch + tl.where(counts >= 1024.0, float("nan"), extra)  # +inf + -inf: NaN
    return patch


@triton.jit
def _store_out(o_ptrs, out, o_mask, OUT, BF16_AS_INT16: tl.constexpr):
    tl.store(o_ptrs, to_storage(out, OUT.dtype.element_ty, BF16_AS_INT16), mask=o_mask)


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K, SEQUSED_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
    heads, group, seqlen_q, seqlen_k, head_dim, qk_scale, softcap, window_left, window_right, dropout_p, seed,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_INT16: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_start, q_len, k_start, k_len = seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    if HAS_SEQUSED_K:  # a KV cache filled to a different length per row: masks align to the used keys
        k_len = tl.load(SEQUSED_K + b)
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        kvh = h // group
        Qb = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qm + h * stride_qh
        Kb = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + kvh * stride_kh
        Vb = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + kvh * stride_vh
        rows = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = load_tile(Qb, rows, offs_d, stride_qm, q_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m1 = tl.minimum(m0 + BLOCK_M, q_len)
        lo, full_lo, full_hi, hi = key_range(m0, m1, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT,
                                             BLOCK_N)
        # Boundary tiles with masks, fully visible tiles without, boundary tiles again.
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, Kb, Vb, stride_kn, stride_vn, rows, offs_d,
                                   head_dim, q_len, k_len, lo, full_lo, qk_scale, softcap, window_left,
                                   window_right, seed, bh, dropout_p, True, SOFTCAP, HAS_LEFT, HAS_RIGHT,
                                   DROPOUT, PRECISION, BF16_AS_INT16, BLOCK_N, DOT_DTYPE)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, Kb, Vb, stride_kn, stride_vn, rows, offs_d,
                                   head_dim, q_len, k_len, full_lo, full_hi, qk_scale, softcap, window_left,
                                   window_right, seed, bh, dropout_p, False, SOFTCAP, HAS_LEFT, HAS_RIGHT,
                                   DROPOUT, PRECISION, BF16_AS_INT16, BLOCK_N, DOT_DTYPE)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, Kb, Vb, stride_kn, stride_vn, rows, offs_d,
                                   head_dim, q_len, k_len, full_hi, hi, qk_scale, softcap, window_left,
                                   window_right, seed, bh, dropout_p, True, SOFTCAP, HAS_LEFT, HAS_RIGHT,
                                   DROPOUT, PRECISION, BF16_AS_INT16, BLOCK_N, DOT_DTYPE)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        # lse in natural-log units; +inf for rows that saw no key (their backward p is 0).
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
        Ob = OUT + b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_om + h * stride_oh
        o_ptrs = Ob + rows.to(tl.int64)[:, None] * stride_om + offs_d[None, :]
        o_mask = (rows[:, None] < q_len) & (offs_d[None, :] < head_dim)
        _store_out(o_ptrs, out, o_mask, OUT, BF16_AS_INT16)
        Lb = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + q_start
        tl.store(Lb + rows, lse, mask=rows < q_len)
        v_bad = tl.maximum(  # an inf / NaN in V of a masked tile (re-read: a few tiles per program)
            _masked_v_nonfinite(Vb, stride_vn, offs_d, head_dim, k_len, lo, full_lo, BF16_AS_INT16, BLOCK_N),
            _masked_v_nonfinite(Vb, stride_vn, offs_d, head_dim, k_len, full_hi, hi, BF16_AS_INT16, BLOCK_N))
        if v_bad > 0:  # an inf / NaN in V of a masked tile (flash_math.h's rule for non-finite inputs)
            # After the store, so that the main loop's registers are free.
            patch = _nonfinite_v_patch(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), m_i, q, Kb, Vb, stride_kn, stride_vn,
                                       rows, offs_d, head_dim, q_len, k_len, qk_scale, softcap, window_left,
                                       window_right, seed, bh, dropout_p, SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT,
                                       PRECISION, BF16_AS_INT16, BLOCK_N, DOT_DTYPE)
            tl.debug_barrier()  # the stored rows are visible to every thread of the program
            out = load_tile(Ob, rows, offs_d, stride_om, q_len, head_dim, BF16_AS_INT16) + patch
            _store_out(o_ptrs, out, o_mask & (patch != 0.0), OUT, BF16_AS_INT16)  # NaN != 0 too


# --------------------------------------------------------------------------- launcher


def _strides3(t, varlen):
    """(batch, row, head) strides; batch stride 0 for the packed layout."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def launch_config(q, head_dim):
    """Tile sizes and dot precision shared by forward and backward."""
    import torch

    from phi_kernels.triton._interp import bf16_as_int16

    interp = q.device.type == "cpu"
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interp:  # the interpreter runs programs one by one: fewer, larger tiles are faster
        block_m, block_n = 64, 64
    else:
        block_m, block_n = (64, 64) if block_d <= 64 else (64, 32) if block_d <= 128 else (32, 32)
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[q.dtype]
    if bf16_as_int16(q):
        dot_dtype = tl.float32  # interpreter: bf16 is decoded to fp32 on load
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs get true fp32 dots
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_DTYPE=dot_dtype, PRECISION=precision,
                BF16_AS_INT16=bf16_as_int16(q)), (4 if block_d <= 64 else 8)


def fwd_launch(q, k, v, args, out, lse):
    """The launch of _flash_fwd_kernel for these tensors and options (a FlashAttnArgs), or None
    when there is nothing to compute. aot_specs compiles the same launch."""
    from phi_kernels.triton._interp import kernel_view
    from phi_kernels.triton._launch import Launch

    varlen = args.cu_seqlens_q is not None
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    batch = args.cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if batch == 0 or args.max_seqlen_q == 0:
        return None
    cfg, num_warps = launch_config(q, head_dim)
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    grid = (triton.cdiv(args.max_seqlen_q, cfg["BLOCK_M"]), batch * heads)
    kernel_args = (
        kernel_view(q), kernel_view(k), kernel_view(v), kernel_view(out), lse, args.cu_seqlens_q, args.cu_seqlens_k,
        args.seqused_k,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen), *lse_strides,
        heads, heads // kv_heads, args.max_seqlen_q, args.max_seqlen_k, head_dim, args.softmax_scale, args.softcap,
        args.window_left, args.window_right, args.dropout_p, args.seed,
    )
    meta = dict(IS_VARLEN=varlen, HAS_SEQUSED_K=args.seqused_k is not None, SOFTCAP=args.softcap > 0,
                HAS_LEFT=args.window_left >= 0, HAS_RIGHT=args.window_right >= 0, DROPOUT=args.dropout_p > 0,
                num_warps=num_warps, num_stages=1 if q.device.type == "cpu" else 2, **cfg)
    return Launch(_flash_fwd_kernel, grid, kernel_args, meta)


def flash_attn_fwd_triton(q, k, v, args, out, lse):
    """Writes out and lse. args: the FlashAttnArgs, validated by phi_kernels.flash_attn
    (seqused_k: sequence b uses only its first seqused_k[b] keys)."""
    launch = fwd_launch(q, k, v, args, out, lse)
    if launch is not None:
        launch()


def aot_specs():
    """phi-1.5 attention for the static report: batch 4 x seqlen 2048, 32 heads x 64, causal;
    and head_dim 128. Forward FLOPs 4*b*s^2*h*d / 2 (causal), flash-attention's convention."""
    import torch

    from phi_kernels.flash_attn import FlashAttnArgs
    from phi_kernels.triton.aot import AotSpec

    specs = []
    b, s, h = 4, 2048, 32
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            q = torch.empty(b, s, h, d, dtype=dtype, device="meta")
            lse = torch.empty(b, h, s, dtype=torch.float32, device="meta")
            args = FlashAttnArgs(max_seqlen_q=s, max_seqlen_k=s, softmax_scale=d**-0.5, window_right=0)
            flops = 4 * b * s * s * h * d / 2
            nbytes = 4 * b * s * h * d * 2 + b * h * s * 4
            specs.append(AotSpec.of_launch(f"flash fwd {AotSpec.type_name(dtype)} d{d} causal",
                                           fwd_launch(q, q, q, args, q, lse), flops=flops, min_bytes=nbytes,
                                           shape=f"b{b} s{s} h{h} d{d} causal", tensor_core=True))
    return specs
