"""Flash attention backward, Triton kernels (FlashAttention-2 algorithm, no atomics).

Contract: as flash_attn_fwd.py, plus dout like q, the forward's out and lse, and dq/dk/dv
written like q/k/v. Math (P recomputed from lse, Z the dropout scaling 1/(1-p) or 0):
    P = exp(S - lse),  dV = (P*Z)^T dO,  dP = (dO V^T) * Z,  D = rowsum(dO * O),
    dS = P * (dP - D) [* (1 - tanh^2) with softcap],  dQ = scale dS K,  dK = scale dS^T Q
(rowsum(dP * P) = rowsum(dO * O) holds with dropout too, so D comes from O.)
Kernels:
  _bwd_preprocess  grid (cdiv(sq, BLOCK_M), batch*heads): D = rowsum(dO * O) in fp32.
  _bwd_dkdv        grid (cdiv(sk, BLOCK_N), batch*kv_heads): a program owns one K/V tile and
                   loops over the query heads of its GQA group and their query tiles, so dK/dV
                   are summed in registers: no atomics, bitwise deterministic.
  _bwd_dq          grid (cdiv(sq, BLOCK_M), batch*heads): a program owns one Q tile, loops over K/V.
All accumulation in fp32; every run gives the same bits (deterministic=True costs nothing).
"""
from __future__ import annotations

import triton
import triton.language as tl

from phi_kernels.triton._interp import to_storage
from phi_kernels.triton.flash_attn_fwd import LOG2E, dropout_keep, key_range, load_tile, scores, seq_bounds, visible


@triton.jit
def _store_tile(ptr, rows, cols, stride_row, n_rows, n_cols, x, BF16_AS_INT16: tl.constexpr):
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptrs, to_storage(x, ptr.dtype.element_ty, BF16_AS_INT16), mask=mask)


@triton.jit
def _bwd_preprocess(
    OUT, DOUT, DELTA, CU_Q, CU_K,
    stride_ob, stride_om, stride_oh, stride_db, stride_dm, stride_dh, stride_lb, stride_lh,
    heads, seqlen_q, seqlen_k, head_dim,
    IS_VARLEN: tl.constexpr, BF16_AS_INT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_start, q_len, k_start, k_len = seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(OUT + b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_om + h * stride_oh, rows, offs_d,
                  stride_om, q_len, head_dim, BF16_AS_INT16)
    do = load_tile(DOUT + b.to(tl.int64) * stride_db + q_start.to(tl.int64) * stride_dm + h * stride_dh, rows, offs_d,
                   stride_dm, q_len, head_dim, BF16_AS_INT16)
    tl.store(DELTA + b.to(tl.int64) * stride_lb + h * stride_lh + q_start + rows, tl.sum(o * do, 1), mask=rows < q_len)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Qb, DOb, Lb, Db, stride_qm, stride_dom, cols, offs_d, head_dim, q_len, k_len,
                blk_start, blk_end, qk_scale, softcap, window_left, window_right, seed, bh, dropout_p,
                MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_INT16: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr):
    for blk in range(blk_start, blk_end):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        q = load_tile(Qb, rows, offs_d, stride_qm, q_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        do = load_tile(DOb, rows, offs_d, stride_dom, q_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        lse = tl.load(Lb + rows, mask=rows < q_len, other=float("inf"))
        delta = tl.load(Db + rows, mask=rows < q_len, other=0.0)
        s, t = scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
        p = tl.exp2(s - (lse * LOG2E)[:, None])  # rows with lse = +inf give 0
        if MASKED:
            p = tl.where(visible(rows, cols, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, bh, rows, cols, dropout_p)
            pz = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            pz = p
        dv += tl.dot(tl.trans(pz.to(DOT_DTYPE)), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def query_range(n0, n1, q_len, k_len, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """For the real key columns [n0, n1) of a tile: query tiles [lo, hi) that see some of them
    and [full_lo, full_hi) whose rows all see every one of them (tile indices, nested)."""
    off = k_len - q_len  # key j is visible from row i iff i + off - left <= j <= i + off + right
    lo = 0
    hi = q_len
    full_lo = 0
    full_hi = q_len
    if HAS_RIGHT:  # j <= i + off + right  <=>  i >= j - off - right
        lo = tl.maximum(n0 - off - window_right, 0)
        full_lo = tl.maximum(n1 - 1 - off - window_right, 0)
    if HAS_LEFT:  # j >= i + off - left  <=>  i <= j - off + left
        hi = tl.minimum(n1 - 1 - off + window_left + 1, q_len)
        full_hi = tl.minimum(n0 - off + window_left + 1, q_len)
    lo_blk = lo // BLOCK_M
    hi_blk = tl.maximum(tl.cdiv(tl.maximum(hi, 0), BLOCK_M), lo_blk)
    full_lo_blk = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M), lo_blk), hi_blk)
    full_hi_blk = tl.maximum(tl.minimum(tl.maximum(full_hi, 0) // BLOCK_M, hi_blk), full_lo_blk)
    return lo_blk, full_lo_blk, full_hi_blk, hi_blk


@triton.jit
def _bwd_dkdv(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    heads, kv_heads, group, seqlen_q, seqlen_k, head_dim, qk_scale, softcap, window_left, window_right,
    dropout_p, seed,
    IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_INT16: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    q_start, q_len, k_start, k_len = seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 < k_len:
        cols = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        Kb = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + kvh * stride_kh
        Vb = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + kvh * stride_vh
        k = load_tile(Kb, cols, offs_d, stride_kn, k_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        v = load_tile(Vb, cols, offs_d, stride_vn, k_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        n1 = tl.minimum(n0 + BLOCK_N, k_len)
        lo, full_lo, full_hi, hi = query_range(n0, n1, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT,
                                               BLOCK_M)
        for g in range(group):  # the query heads reading this kv head, summed in order
            h = kvh * group + g
            bh = b * heads + h
            Qb = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qm + h * stride_qh
            DOb = DOUT + b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dom + h * stride_doh
            Lb = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + q_start
            Db = DELTA + b.to(tl.int64) * stride_lb + h * stride_lh + q_start
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qb, DOb, Lb, Db, stride_qm, stride_dom, cols, offs_d, head_dim, q_len,
                                 k_len, lo, full_lo, qk_scale, softcap, window_left, window_right, seed, bh,
                                 dropout_p, True, SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT, PRECISION, BF16_AS_INT16,
                                 BLOCK_M, DOT_DTYPE)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qb, DOb, Lb, Db, stride_qm, stride_dom, cols, offs_d, head_dim, q_len,
                                 k_len, full_lo, full_hi, qk_scale, softcap, window_left, window_right, seed, bh,
                                 dropout_p, False, SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT, PRECISION, BF16_AS_INT16,
                                 BLOCK_M, DOT_DTYPE)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qb, DOb, Lb, Db, stride_qm, stride_dom, cols, offs_d, head_dim, q_len,
                                 k_len, full_hi, hi, qk_scale, softcap, window_left, window_right, seed, bh,
                                 dropout_p, True, SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT, PRECISION, BF16_AS_INT16,
                                 BLOCK_M, DOT_DTYPE)
        # dK = scale * dS^T Q: scale once here (scores() folded it into the exponent).
        _store_tile(DK + b.to(tl.int64) * stride_dkb + k_start.to(tl.int64) * stride_dkn + kvh * stride_dkh, cols,
                    offs_d, stride_dkn, k_len, head_dim, dk * qk_scale, BF16_AS_INT16)
        _store_tile(DV + b.to(tl.int64) * stride_dvb + k_start.to(tl.int64) * stride_dvn + kvh * stride_dvh, cols,
                    offs_d, stride_dvn, k_len, head_dim, dv, BF16_AS_INT16)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, Kb, Vb, stride_kn, stride_vn, rows, offs_d, head_dim, q_len, k_len,
              blk_start, blk_end, qk_scale, softcap, window_left, window_right, seed, bh, dropout_p,
              MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_INT16: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr):
    for blk in range(blk_start, blk_end):
        cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_tile(Kb, cols, offs_d, stride_kn, k_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        v = load_tile(Vb, cols, offs_d, stride_vn, k_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        s, t = scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
        p = tl.exp2(s - (lse * LOG2E)[:, None])
        if MASKED:
            p = tl.where(visible(rows, cols, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, bh, rows, cols, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq(
    Q, K, V, DOUT, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
    heads, group, seqlen_q, seqlen_k, head_dim, qk_scale, softcap, window_left, window_right, dropout_p, seed,
    IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_INT16: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_start, q_len, k_start, k_len = seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        kvh = h // group
        rows = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        Qb = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qm + h * stride_qh
        DOb = DOUT + b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dom + h * stride_doh
        Kb = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + kvh * stride_kh
        Vb = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + kvh * stride_vh
        q = load_tile(Qb, rows, offs_d, stride_qm, q_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        do = load_tile(DOb, rows, offs_d, stride_dom, q_len, head_dim, BF16_AS_INT16).to(DOT_DTYPE)
        Lb = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + q_start
        lse = tl.load(Lb + rows, mask=rows < q_len, other=float("inf"))
        delta = tl.load(DELTA + b.to(tl.int64) * stride_lb + h * stride_lh + q_start + rows, mask=rows < q_len,
                        other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m1 = tl.minimum(m0 + BLOCK_M, q_len)
        lo, full_lo, full_hi, hi = key_range(m0, m1, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT,
                                             BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse, delta, Kb, Vb, stride_kn, stride_vn, rows, offs_d, head_dim, q_len, k_len, lo,
                       full_lo, qk_scale, softcap, window_left, window_right, seed, bh, dropout_p, True, SOFTCAP,
                       HAS_LEFT, HAS_RIGHT, DROPOUT, PRECISION, BF16_AS_INT16, BLOCK_N, DOT_DTYPE)
        dq = _dq_tiles(dq, q, do, lse, delta, Kb, Vb, stride_kn, stride_vn, rows, offs_d, head_dim, q_len, k_len,
                       full_lo, full_hi, qk_scale, softcap, window_left, window_right, seed, bh, dropout_p, False,
                       SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT, PRECISION, BF16_AS_INT16, BLOCK_N, DOT_DTYPE)
        dq = _dq_tiles(dq, q, do, lse, delta, Kb, Vb, stride_kn, stride_vn, rows, offs_d, head_dim, q_len, k_len,
                       full_hi, hi, qk_scale, softcap, window_left, window_right, seed, bh, dropout_p, True, SOFTCAP,
                       HAS_LEFT, HAS_RIGHT, DROPOUT, PRECISION, BF16_AS_INT16, BLOCK_N, DOT_DTYPE)
        _store_tile(DQ + b.to(tl.int64) * stride_dqb + q_start.to(tl.int64) * stride_dqm + h * stride_dqh, rows,
                    offs_d, stride_dqm, q_len, head_dim, dq * qk_scale, BF16_AS_INT16)


# --------------------------------------------------------------------------- launcher


def dkdv_config(cfg: dict, head_dim: int, interpreting: bool) -> tuple[dict, int]:
    """Tiles of the dK/dV kernel. It holds K, V, dK, dV tiles plus a Q tile's S, P, dP, dS, and
    ran out of registers (stack spills) at 64x64 tiles with 4 warps; these are the configs with
    zero spill bytes on sm_80 and sm_90 in the static report (phi_kernels.inspect)."""
    if interpreting:
        return cfg, 4
    if head_dim <= 64:
        return dict(cfg, BLOCK_M=64, BLOCK_N=32), 8
    return dict(cfg, BLOCK_M=32, BLOCK_N=32), 8


def bwd_launches(dout, q, k, v, out, lse, args, dq, dk, dv, delta) -> dict:
    """The launches of the three kernels for these tensors and options (a FlashAttnArgs), by
    kernel name ("preprocess", "dkdv", "dq"; a kernel with nothing to do is left out). delta:
    fp32 like lse, the preprocess kernel's output. aot_specs compiles the same launches."""
    from phi_kernels.triton._interp import kernel_view
    from phi_kernels.triton._launch import Launch
    from phi_kernels.triton.flash_attn_fwd import _strides3, launch_config

    varlen = args.cu_seqlens_q is not None
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    batch = args.cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if batch == 0:
        return {}
    max_q, max_k, cu_q, cu_k = args.max_seqlen_q, args.max_seqlen_k, args.cu_seqlens_q, args.cu_seqlens_k
    cfg, num_warps = launch_config(q, head_dim)
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    kq, kk, kv, ko, kdo = (kernel_view(t) for t in (q, k, v, out, dout))
    stages = 1 if q.device.type == "cpu" else 2
    flags = dict(IS_VARLEN=varlen, SOFTCAP=args.softcap > 0, HAS_LEFT=args.window_left >= 0,
                 HAS_RIGHT=args.window_right >= 0, DROPOUT=args.dropout_p > 0)
    scalars = (max_q, max_k, head_dim, args.softmax_scale, args.softcap, args.window_left, args.window_right,
               args.dropout_p, args.seed)
    launches = {}
    if max_q > 0:
        launches["preprocess"] = Launch(
            _bwd_preprocess, (triton.cdiv(max_q, cfg["BLOCK_M"]), batch * heads),
            (ko, kdo, delta, cu_q, cu_k, *_strides3(out, varlen), *_strides3(dout, varlen), *lse_strides,
             heads, max_q, max_k, head_dim),
            dict(IS_VARLEN=varlen, BF16_AS_INT16=cfg["BF16_AS_INT16"], BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_D=cfg["BLOCK_D"], num_warps=num_warps))
    if max_k > 0:
        dkdv_cfg, dkdv_warps = dkdv_config(cfg, head_dim, q.device.type == "cpu")
        launches["dkdv"] = Launch(
            _bwd_dkdv, (triton.cdiv(max_k, dkdv_cfg["BLOCK_N"]), batch * kv_heads),
            (kq, kk, kv, kdo, lse, delta, kernel_view(dk), kernel_view(dv), cu_q, cu_k,
             *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen),
             *_strides3(dk, varlen), *_strides3(dv, varlen), *lse_strides,
             heads, kv_heads, heads // kv_heads, *scalars),
            dict(**flags, num_warps=dkdv_warps, num_stages=stages, **dkdv_cfg))
    if max_q > 0:
        # 8 warps on a GPU: with 4, the head_dim-64 dQ kernel (q, dO, dQ and a 64x64 score tile
        # per program) spilled on sm_80 once the report compiled it with the divisibility hints
        # Triton's JIT gives its strides (phi_kernels.inspect).
        dq_warps = num_warps if q.device.type == "cpu" else 8
        launches["dq"] = Launch(
            _bwd_dq, (triton.cdiv(max_q, cfg["BLOCK_M"]), batch * heads),
            (kq, kk, kv, kdo, lse, delta, kernel_view(dq), cu_q, cu_k,
             *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen),
             *_strides3(dq, varlen), *lse_strides,
             heads, heads // kv_heads, *scalars),
            dict(**flags, num_warps=dq_warps, num_stages=stages, **cfg))
    return launches


def flash_attn_bwd_triton(dout, q, k, v, out, lse, args, dq, dk, dv):
    """Writes dq, dk, dv (bitwise deterministic: no atomics). args: the FlashAttnArgs, validated
    upstream."""
    import torch

    for launch in bwd_launches(dout, q, k, v, out, lse, args, dq, dk, dv, torch.empty_like(lse)).values():
        launch()


def aot_specs():
    """Backward at phi-1.5 shapes (b4 s2048 h32 d64 causal, and d128): dK/dV and dQ kernels.
    FLOPs: 2.5 x forward in flash-attention's convention, split 60/40 between the two."""
    import torch

    from phi_kernels.flash_attn import FlashAttnArgs
    from phi_kernels.triton.aot import AotSpec

    specs = []
    b, s, h = 4, 2048, 32
    for dtype in (torch.float16, torch.bfloat16):
        dt = AotSpec.type_name(dtype)
        for d in (64, 128):
            q = torch.empty(b, s, h, d, dtype=dtype, device="meta")
            lse = torch.empty(b, h, s, dtype=torch.float32, device="meta")
            args = FlashAttnArgs(max_seqlen_q=s, max_seqlen_k=s, softmax_scale=d**-0.5, window_right=0)
            launches = bwd_launches(q, q, q, q, q, lse, args, q, q, q, torch.empty_like(lse))
            fwd_flops = 4 * b * s * s * h * d / 2
            io = b * s * h * d * 2
            shape = f"b{b} s{s} h{h} d{d} causal"
            specs.append(AotSpec.of_launch(f"flash bwd dk/dv {dt} d{d} causal", launches["dkdv"],
                                           flops=1.5 * fwd_flops, min_bytes=6 * io, shape=shape, tensor_core=True))
            specs.append(AotSpec.of_launch(f"flash bwd dq {dt} d{d} causal", launches["dq"], flops=1.0 * fwd_flops,
                                           min_bytes=5 * io, shape=shape, tensor_core=True))
    return specs
