// Flash attention forward, sm_80+ (flash-attention 2's algorithm). Traits: kernel_traits.h;
// masking, online softmax, softcap and dropout rules: flash_math.h (shared with the CPU
// kernels and tested there); fragment layouts: fragment_layout.h.
//
// CTA = (query tile of kBlockM rows, sequence, head); warp w owns rows 16w .. 16w + 15.
// grid = (tiles x sequences, heads): see flash_plan.h.
//   Q tile -> smem -> each warp's 16 rows into registers (A fragments), once. For each key tile
//   in the rows' visible range:
//     wait K; start loading V;  S = Q K^T (fp32, registers);  scale, softcap, mask;
//     online softmax (row max over the 4 lanes of a row, rescale O);  P -> fp16/bf16 A fragments;
//     wait V; start loading the next K;  O += P V.
//   O /= row sum; write O and the LSE.
#pragma once
#include "common/cuda_types.cuh"
#include "flash_attn/flash.h"
#include "flash_attn/flash_plan.h"
#include "flash_attn/kernel_traits.h"
#include "flash_attn/mma_sm80.cuh"

namespace phi::flash {

template <class Kt, typename T>
__global__ void __launch_bounds__(Kt::kThreads) flash_fwd_kernel(const Flash_params p) {
  constexpr int D = Kt::kHeadDim, M = Kt::kBlockM, N = Kt::kBlockN;
  constexpr int kNTs = N / 8;  // score tiles per warp row block
  constexpr int kNTo = D / 8;  // output tiles
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + M * D;
  T* sV = sK + N * D;

  const int n_tiles = tiles_of(p.seqlen_q, M);  // grid.x = (query tile, sequence), flash_plan.h
  const int m_block = blockIdx.x % n_tiles, b = blockIdx.x / n_tiles, h = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const Flash_seq seq = Flash_seq::of(p, b);
  const int r0 = m_block * M;
  if (r0 >= seq.seqlen_q) return;
  const Mask mask = seq.mask(p);
  const int kvh = p.kv_head(h);
  const T* q = static_cast<const T*>(p.q) + seq.q_offset(p, b, h, 0, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  const T* k = static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, 0, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const T* v = static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, 0, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  T* out = static_cast<T*>(p.out) + seq.q_offset(p, b, h, 0, p.out_batch_stride, p.out_row_stride, p.out_head_stride);

  int c_begin, c_end;
  mask.key_range(r0, min(r0 + M, seq.seqlen_q), &c_begin, &c_end);
  const int n_begin = c_begin / N, n_end = c_end > c_begin ? (c_end + N - 1) / N : n_begin;

  load_tile_async<M, D, Kt::kThreads>(sQ, q, p.q_row_stride, r0, seq.seqlen_q, tid);
  if (n_begin < n_end) load_tile_async<N, D, Kt::kThreads>(sK, k, p.k_row_stride, n_begin * N, seq.seqlen_k, tid);
  cp_async_commit();

  float acc_o[kNTo][4] = {};
  OnlineSoftmax row_state[2];  // this lane's two rows: warp row lane/4 and lane/4 + 8
  const int wrow0 = r0 + warp * 16;  // first row of this warp
  const uint32_t bh = uint32_t(b * p.heads + h);
  uint32_t q_frag[D / 16][4];  // this warp's Q rows, held in registers for every key tile

  for (int nb = n_begin; nb < n_end; ++nb) {
    const int c0 = nb * N;
    cp_async_wait_all();
    __syncthreads();  // K tile nb is in shared memory for every warp; V's buffer is free
    load_tile_async<N, D, Kt::kThreads>(sV, v, p.v_row_stride, c0, seq.seqlen_k, tid);
    cp_async_commit();
    if (nb == n_begin) load_a_frags<D, D>(q_frag, sQ, warp * 16, lane);

    float acc_s[kNTs][4] = {};
    warp_gemm_rs<kNTs, D, false, D>(acc_s, q_frag, sK, 0, lane);

    const bool all_visible = mask.tile_all_visible(wrow0, wrow0 + 16, c0, c0 + N);
    float tile_max[2] = {-kInf, -kInf};
    #pragma unroll
    for (int nt = 0; nt < kNTs; ++nt) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = apply_softcap(acc_s[nt][e] * p.scale, p.softcap) * kLog2e;
        if (!all_visible && !mask.visible(wrow0 + acc_row(lane, e), c0 + nt * 8 + acc_col(lane, e))) x = -kInf;
        acc_s[nt][e] = x;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
      }
    }
    #pragma unroll
    for (int half = 0; half < 2; ++half) {  // the 4 lanes of a row hold its 8 * kNTs scores
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
      const float factor = row_state[half].rescale(tile_max[half]);
      #pragma unroll
      for (int dt = 0; dt < kNTo; ++dt) {
        acc_o[dt][2 * half] *= factor;
        acc_o[dt][2 * half + 1] *= factor;
      }
    }
    uint32_t dropout_hash[2];
    if (p.dropout.enabled()) {
      dropout_hash[0] = p.dropout.row_hash(bh, uint32_t(wrow0 + acc_row(lane, 0)));
      dropout_hash[1] = p.dropout.row_hash(bh, uint32_t(wrow0 + acc_row(lane, 2)));
    }
    #pragma unroll
    for (int nt = 0; nt < kNTs; ++nt) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        OnlineSoftmax& st = row_state[e >> 1];
        float prob = st.prob(acc_s[nt][e]);
        st.sum += prob;  // this lane's partial row sum (of undropped probabilities)
        if (p.dropout.enabled()) {
          prob = p.dropout.keep(dropout_hash[e >> 1], uint32_t(c0 + nt * 8 + acc_col(lane, e))) ? prob * p.dropout.scale
                                                                                                 : 0.f;
        }
        acc_s[nt][e] = prob;
      }
    }
    uint32_t p_frag[kNTs / 2][4];
    acc_to_a<kNTs, T>(acc_s, p_frag);

    cp_async_wait_all();
    __syncthreads();  // V tile nb is in shared memory; every warp is done reading K
    if (nb + 1 < n_end) load_tile_async<N, D, Kt::kThreads>(sK, k, p.k_row_stride, c0 + N, seq.seqlen_k, tid);
    cp_async_commit();
    warp_gemm_rs<kNTo, N, true, D>(acc_o, p_frag, sV, 0, lane);
  }
  cp_async_wait_all();

  #pragma unroll
  for (int half = 0; half < 2; ++half) {
    OnlineSoftmax& st = row_state[half];
    st.sum += __shfl_xor_sync(0xffffffffu, st.sum, 1);
    st.sum += __shfl_xor_sync(0xffffffffu, st.sum, 2);
    const int row = wrow0 + acc_row(lane, 2 * half);
    const float inv = st.inv_sum();
    if (row < seq.seqlen_q) {
      T* dst = out + int64_t(row) * p.out_row_stride;
      #pragma unroll
      for (int dt = 0; dt < kNTo; ++dt) {
        const int col = dt * 8 + acc_col(lane, 0);
        st_global(reinterpret_cast<uint32_t*>(dst + col), pack2<T>(acc_o[dt][2 * half] * inv, acc_o[dt][2 * half + 1] * inv));
      }
      if ((lane & 3) == 0) st_global(p.lse + seq.lse_index(p, b, h, row), st.lse());
    }
  }
}

}  // namespace phi::flash
