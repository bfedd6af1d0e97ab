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
//
// Non-finite V (flash_math.h's rule: a key a row cannot see never affects it). P V runs over
// whole key tiles, and a masked key's P = 0 does not hide its v: 0 * inf = 0 * NaN = NaN. So in
// a key tile where masking applies to some row of the CTA, each thread also checks the V chunks
// it copied; the warps' verdicts meet in shared memory at the barrier that publishes V. Only
// when that V tile holds an inf or NaN do the warps with masked rows take the slow path: P V
// with those elements as 0, plus their exact contribution added per (row, column) from the
// visible keys (add_nonfinite_v). Tiles without masking, and masked tiles with a finite V, run
// the same mma sequence as before.
#pragma once
#include "common/cuda_types.cuh"
#include "flash_attn/flash.h"
#include "flash_attn/flash_plan.h"
#include "flash_attn/kernel_traits.h"
#include "flash_attn/mma_sm80.cuh"

namespace phi::flash {

// Where warp w posts whether its V chunks hold an inf / NaN: the first 16-byte chunk of its own
// first Q row in shared memory. The Q tile is read once, into registers, at the first key tile,
// each warp reading only its own rows, and lane 0 is the lane that read this chunk: lane 0
// overwriting it afterwards races with nobody.
template <int D, typename T>
__device__ __forceinline__ uint32_t v_flag_addr(const T* sQ, int warp) {
  return smem_addr(sQ + Swizzled<D>::offset(warp * 16, 0));
}

// Each thread checks the V chunks it copied itself (landed: it has waited for its cp.async, and
// ldmatrix.sync runs once every lane of the warp has, so reading them before the barrier is no
// race), the warp ORs the answers and lane 0 posts the warp's flag. ldmatrix is the shared-memory
// read: lane l gives the address of its own chunk, and the OR over the warp covers every chunk
// whoever receives its bytes.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void post_v_nonfinite(const T* sV, const T* sQ, int warp, int lane, int tid) {
  constexpr int kChunks = kCols / 8;
  static_assert(kRows * kChunks % kThreads == 0, "every lane of a warp takes part in each ldmatrix");
  uint32_t bad = 0;
  #pragma unroll 1  // one ldmatrix in flight: registers are scarce here (P, O and Q are live)
  for (int idx = tid; idx < kRows * kChunks; idx += kThreads) {
    uint32_t r[4];
    ldmatrix_x4(r, smem_addr(sV + Swizzled<kCols>::offset(idx / kChunks, (idx % kChunks) * 8)));
    #pragma unroll
    for (int i = 0; i < 4; ++i) bad |= nonfinite_halves<T>(r[i]);
  }
  #pragma unroll
  for (int off = 1; off < 32; off <<= 1) bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  if (lane == 0) {
    const uint32_t addr = v_flag_addr<kCols>(sQ, warp);
    #pragma unroll
    for (int i = 0; i < 4; ++i) st_shared_b32(addr + 4 * i, bad);
  }
}

// After the barrier: whether any warp posted a non-finite V (one ldmatrix; lanes 8w .. 8w + 7
// give warp w's flag chunk, so register w of every lane holds warp w's flag).
template <int D, int kNWarps, typename T>
__device__ __forceinline__ bool v_tile_nonfinite(const T* sQ, int lane) {
  static_assert(kNWarps == 4, "one ldmatrix matrix per warp's flag");
  uint32_t r[4];
  ldmatrix_x4(r, v_flag_addr<D>(sQ, lane >> 3));
  return (r[0] | r[1] | r[2] | r[3]) != 0;
}

// acc_o += what P V over a V tile with its inf / NaN elements zeroed left out, per element this
// lane owns (rows row0 and row0 + 8, columns 8 dt + 2 (lane % 4) + {0, 1}): for every key j of
// the tile the row sees with a non-finite v[j][c], p * v[j][c] with IEEE semantics: NaN when v
// is NaN or p is 0 (underflow, dropout), else inf of v's sign; summed, so +inf and -inf give
// NaN. Keys the row cannot see add nothing. p_nonzero[h], bit 2 nt + e: p != 0 (fp32, after
// dropout) at key 8 nt + 2 (lane % 4) + e of row half h (the accumulator layout), gathered from
// the row's four lanes. v is read from global memory (rare path: a masked tile whose V holds an
// inf or NaN).
template <int kNTo, int N, typename T>
__device__ __forceinline__ void add_nonfinite_v(float (&acc_o)[kNTo][4], const uint32_t (&p_nonzero)[2],
                                                const Mask& mask, const T* v, int64_t v_row_stride, int row0, int c0,
                                                int lane) {
  uint32_t quad[2][4];  // the masks of the four lanes that share this lane's rows
  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    #pragma unroll
    for (int q = 0; q < 4; ++q) quad[h][q] = __shfl_sync(0xffffffffu, p_nonzero[h], (lane & ~3) | q);
  }
  constexpr uint32_t kExpHalf = Half_bits<T>::kExp;
  #pragma unroll 1
  for (int j = 0; j < N; ++j) {
    const int col = c0 + j;
    const bool sees[2] = {mask.visible(row0, col), mask.visible(row0 + 8, col)};
    if (!sees[0] && !sees[1]) continue;  // also every key past the sequence's end
    const int q = (j >> 1) & 3, bit = (j >> 3) * 2 + (j & 1);
    bool p_pos[2];
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t m = q == 0 ? quad[h][0] : q == 1 ? quad[h][1] : q == 2 ? quad[h][2] : quad[h][3];
      p_pos[h] = (m >> bit) & 1u;
    }
    const T* vrow = v + int64_t(col) * v_row_stride + 2 * (lane & 3);
    #pragma unroll
    for (int dt = 0; dt < kNTo; ++dt) {
      const uint32_t pair = ld_global(reinterpret_cast<const uint32_t*>(vrow + dt * 8));
      const uint32_t bad = nonfinite_halves<T>(pair);
      if (bad == 0u) continue;
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint32_t x = (pair >> (16 * e)) & 0xffffu;
        if (!((bad >> (16 * e + 15)) & 1u)) continue;
        const bool is_nan = (x & 0x7fffu) != kExpHalf;
        const float add = is_nan ? NAN : (x & 0x8000u) ? -kInf : kInf;
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (sees[h]) acc_o[dt][2 * h + e] += p_pos[h] ? add : NAN;
        }
      }
    }
  }
}

template <class Kt, typename T>
__global__ void __launch_bounds__(Kt::kThreads) flash_fwd_kernel(const Flash_params p) {
  constexpr int D = Kt::kHeadDim, M = Kt::kBlockM, N = Kt::kBlockN;
  constexpr int kNTs = N / 8;  // score tiles per warp row block
  constexpr int kNTo = D / 8;  // output tiles
  static_assert(2 * kNTs <= 32, "a lane's keys of a row in a key tile fit one 32-bit mask (p_nonzero)");
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
    uint32_t p_nonzero[2] = {0u, 0u};  // masked warps: which keys have p != 0 (non-finite V)
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
        if (!all_visible) p_nonzero[e >> 1] |= (prob != 0.f ? 1u : 0u) << (2 * nt + (e & 1));  // add_nonfinite_v
      }
    }
    uint32_t p_frag[kNTs / 2][4];
    acc_to_a<kNTs, T>(acc_s, p_frag);

    // Some row of the CTA misses some key of this tile (keys past the sequence's end are
    // zero-filled and do not count): V must be checked for inf / NaN (see the top).
    const bool cta_masked =
        !mask.tile_all_visible(r0, min(r0 + M, seq.seqlen_q), c0, min(c0 + N, seq.seqlen_k));
    cp_async_wait_all();
    if (cta_masked) post_v_nonfinite<N, D, Kt::kThreads>(sV, sQ, warp, lane, tid);
    __syncthreads();  // V tile nb is in shared memory; every warp is done reading K
    if (nb + 1 < n_end) load_tile_async<N, D, Kt::kThreads>(sK, k, p.k_row_stride, c0 + N, seq.seqlen_k, tid);
    cp_async_commit();
    if (cta_masked && !all_visible && v_tile_nonfinite<D, Kt::kNWarps>(sQ, lane)) {
      warp_gemm_rs<kNTo, N, true, D, true>(acc_o, p_frag, sV, 0, lane);
      add_nonfinite_v<kNTo, N>(acc_o, p_nonzero, mask, v, p.v_row_stride, wrow0 + acc_row(lane, 0), c0,
                               lane);
    } else {
      warp_gemm_rs<kNTo, N, true, D>(acc_o, p_frag, sV, 0, lane);
    }
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
