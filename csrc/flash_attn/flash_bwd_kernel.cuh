// Flash attention backward, sm_80+ (flash-attention 2's algorithm). Traits: kernel_traits.h;
// the probability / softmax-gradient / softcap / dropout rules: flash_math.h (shared with
// the CPU kernels); fragment layouts: fragment_layout.h.
//
// CTA = (key tile of kBlockN keys, sequence, query head). K, V tiles -> smem once; dK, dV
// accumulate in registers. For each query tile that sees the keys:
//   Q, dO tiles are in smem (double-buffered: the next tile's copy runs during this one);
//   S = Q K^T, dP = dO V^T (fp32 registers);
//   P = exp(S - lse) (recomputed from the forward's LSE), dS = P (dP - D) * scale, masked;
//   P, dS -> smem (16-bit);  dV += P^T dO;  dK += dS^T Q;  dQ += dS K (fp32 atomics into
//   dq_accum, since other key tiles add to the same rows).
// Warp w sits at (w % 4, w / 4) of a 4 x 2 grid: rows 16 (w % 4), column half w / 4 of every
// product. D = rowsum(dO * O) comes precomputed in p.d_rows (same layout as lse).
// With GQA the CTA writes dK, dV of its query head (p.dk/p.dv are then (.., heads, d)
// buffers that the host sums over each group).
#pragma once
#include "common/cuda_types.cuh"
#include "flash_attn/flash.h"
#include "flash_attn/flash_plan.h"
#include "flash_attn/kernel_traits.h"
#include "flash_attn/mma_sm80.cuh"

namespace phi::flash {

template <class Kt, typename T>
__global__ void __launch_bounds__(Kt::kThreads, 1) flash_bwd_kernel(const Flash_params p) {
  constexpr int D = Kt::kHeadDim, M = Kt::kBlockM, N = Kt::kBlockN;
  static_assert(M == 64 && N == 64 && Kt::kNWarps == 8, "the 4 x 2 warp grid covers 64 x 64 tiles");
  constexpr int kNTs = N / 2 / 8;  // score tiles per warp: 16 rows x 32 columns
  constexpr int kNTd = D / 2 / 8;  // dK / dV / dQ tiles per warp: 16 rows x d/2 columns
  extern __shared__ __align__(128) unsigned char smem[];
  T* const sQ0 = reinterpret_cast<T*>(smem);  // [2][M][D]
  T* const sdO0 = sQ0 + 2 * M * D;              // [2][M][D]
  T* sK = sdO0 + 2 * M * D;
  T* sV = sK + N * D;
  T* sP = sV + N * D;   // [M][N]
  T* sdS = sP + M * N;  // [M][N]

  const int n_tiles = tiles_of(p.seqlen_k, N);  // grid.x = (key tile, sequence), flash_plan.h
  const int n_block = blockIdx.x % n_tiles, b = blockIdx.x / n_tiles, h = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;
  const Flash_seq seq = Flash_seq::of(p, b);
  const int c0 = n_block * N;
  if (c0 >= seq.seqlen_k) return;
  const Mask mask = seq.mask(p);
  const int kvh = p.kv_head(h);
  const T* q = static_cast<const T*>(p.q) + seq.q_offset(p, b, h, 0, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  const T* dout = static_cast<const T*>(p.dout) +
                  seq.q_offset(p, b, h, 0, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  const T* k = static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, 0, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const T* v = static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, 0, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  // dq_accum is fp32 with q's (rows, heads, d) layout made contiguous.
  float* dq_acc = p.dq_accum + (seq.q_row0 + (p.is_varlen() ? 0 : int64_t(b) * p.seqlen_q)) * p.heads * D + h * D;
  const int64_t dq_acc_row_stride = int64_t(p.heads) * D;

  float acc_dk[kNTd][4] = {};
  float acc_dv[kNTd][4] = {};
  int r_begin, r_end;
  mask.row_range(c0, min(c0 + N, seq.seqlen_k), &r_begin, &r_end);
  const int m_begin = r_begin / M, m_end = r_end > r_begin ? (r_end + M - 1) / M : m_begin;
  const uint32_t bh = uint32_t(b * p.heads + h);

  load_tile_async<N, D, Kt::kThreads>(sK, k, p.k_row_stride, c0, seq.seqlen_k, tid);
  load_tile_async<N, D, Kt::kThreads>(sV, v, p.v_row_stride, c0, seq.seqlen_k, tid);
  if (m_begin < m_end) {
    load_tile_async<M, D, Kt::kThreads>(sQ0, q, p.q_row_stride, m_begin * M, seq.seqlen_q, tid);
    load_tile_async<M, D, Kt::kThreads>(sdO0, dout, p.dout_row_stride, m_begin * M, seq.seqlen_q, tid);
  }
  cp_async_commit();

  for (int mb = m_begin; mb < m_end; ++mb) {
    const int m0 = mb * M;
    const int buf = (mb - m_begin) & 1;
    T* const sQ = sQ0 + buf * M * D;
    T* const sdO = sdO0 + buf * M * D;
    cp_async_wait_all();
    __syncthreads();  // tile mb is in smem, and every warp is done with the previous tile's buffers
    if (mb + 1 < m_end) {  // prefetch the next query tile into the other buffer
      load_tile_async<M, D, Kt::kThreads>(sQ0 + (buf ^ 1) * M * D, q, p.q_row_stride, m0 + M, seq.seqlen_q, tid);
      load_tile_async<M, D, Kt::kThreads>(sdO0 + (buf ^ 1) * M * D, dout, p.dout_row_stride, m0 + M, seq.seqlen_q, tid);
    }
    cp_async_commit();

    float acc_s[kNTs][4] = {};
    float acc_dp[kNTs][4] = {};
    warp_gemm_ss<kNTs, D, false, false, D, D>(acc_s, sQ, wm * 16, sK, wn * (N / 2), lane);
    warp_gemm_ss<kNTs, D, false, false, D, D>(acc_dp, sdO, wm * 16, sV, wn * (N / 2), lane);

    const int wrow0 = m0 + wm * 16, wcol0 = c0 + wn * (N / 2);
    const bool all_visible = mask.tile_all_visible(wrow0, wrow0 + 16, wcol0, wcol0 + N / 2);
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = wrow0 + acc_row(lane, 2 * half);
      const bool row_ok = row < seq.seqlen_q;
      const float lse = row_ok ? ld_global(p.lse + seq.lse_index(p, b, h, row)) : kInf;
      const float d_row = row_ok ? ld_global(p.d_rows + seq.lse_index(p, b, h, row)) : 0.f;
      const uint32_t hash = p.dropout.enabled() ? p.dropout.row_hash(bh, uint32_t(row)) : 0u;
      #pragma unroll
      for (int nt = 0; nt < kNTs; ++nt) {
        float pv[2], dsv[2];
        #pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int e = 2 * half + j, col = wcol0 + nt * 8 + acc_col(lane, e);
          const float capped = apply_softcap(acc_s[nt][e] * p.scale, p.softcap);
          float prob = prob_from_lse(capped, lse);
          if (!all_visible && !mask.visible(row, col)) prob = 0.f;
          float kept = prob, dprob = acc_dp[nt][e];
          if (p.dropout.enabled()) {
            const bool keep = p.dropout.keep(hash, uint32_t(col));
            kept = keep ? prob * p.dropout.scale : 0.f;
            dprob = keep ? dprob * p.dropout.scale : 0.f;
          }
          pv[j] = kept;
          dsv[j] = softmax_grad(prob, dprob, d_row) * softcap_grad(capped, p.softcap) * p.scale;
        }
        const int srow = wm * 16 + acc_row(lane, 2 * half), scol = wn * (N / 2) + nt * 8 + acc_col(lane, 0);
        store_pair<N>(sP, srow, scol, pack2<T>(pv[0], pv[1]));
        store_pair<N>(sdS, srow, scol, pack2<T>(dsv[0], dsv[1]));
      }
    }
    __syncthreads();  // P and dS of the whole tile are in shared memory

    // dV += P^T dO and dK += dS^T Q: rows = this warp's 16 keys, columns = its half of d.
    warp_gemm_ss<kNTd, M, true, true, N, D>(acc_dv, sP, wm * 16, sdO, wn * (D / 2), lane);
    warp_gemm_ss<kNTd, M, true, true, N, D>(acc_dk, sdS, wm * 16, sQ, wn * (D / 2), lane);
    // dQ (this tile's part) = dS K: rows = this warp's 16 query rows.
    float acc_dq[kNTd][4] = {};
    warp_gemm_ss<kNTd, N, false, true, N, D>(acc_dq, sdS, wm * 16, sK, wn * (D / 2), lane);
    #pragma unroll
    for (int dt = 0; dt < kNTd; ++dt) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = wrow0 + acc_row(lane, e);
        if (row < seq.seqlen_q) {
          atomic_add_global(dq_acc + int64_t(row) * dq_acc_row_stride + wn * (D / 2) + dt * 8 + acc_col(lane, e),
                            acc_dq[dt][e]);
        }
      }
    }
  }
  cp_async_wait_all();

  // dK, dV of this CTA's keys (zero when no query row sees them).
  T* dk = static_cast<T*>(p.dk) + seq.k_offset(p, b, h, 0, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  T* dv = static_cast<T*>(p.dv) + seq.k_offset(p, b, h, 0, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  #pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = c0 + wm * 16 + acc_row(lane, 2 * half);
    if (key >= seq.seqlen_k) continue;
    #pragma unroll
    for (int dt = 0; dt < kNTd; ++dt) {
      const int col = wn * (D / 2) + dt * 8 + acc_col(lane, 0);
      st_global(reinterpret_cast<uint32_t*>(dk + int64_t(key) * p.dk_row_stride + col),
                pack2<T>(acc_dk[dt][2 * half], acc_dk[dt][2 * half + 1]));
      st_global(reinterpret_cast<uint32_t*>(dv + int64_t(key) * p.dv_row_stride + col),
                pack2<T>(acc_dv[dt][2 * half], acc_dv[dt][2 * half + 1]));
    }
  }
}

}  // namespace phi::flash
