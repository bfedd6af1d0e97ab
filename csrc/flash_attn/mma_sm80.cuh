// Warp-level building blocks of the CUDA flash attention kernels, written against the
// instruction wrappers of common/ptx.cuh (cp.async, ldmatrix, mma.sync.m16n8k16, st.shared):
// cp.async tile loads into swizzled shared memory and warp GEMMs over shared-memory tiles or
// register fragments. Addresses come from fragment_layout.h. The same code runs under nvcc and
// in the SIMT emulator (csrc/simt), which swaps only the wrappers.
#pragma once
#include <cstdint>

#include "common/ptx.cuh"
#include "flash_attn/fragment_layout.h"

namespace phi::flash {

// Two fp32 values as one register of two 16-bit values, `lo` in the low half (element order
// of the mma fragments).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Non-finite 16-bit values (exponent all ones: inf or NaN) of a register holding two: bit 15
// is set when the low half is one, bit 31 when the high half is. (x & exp) + exp's lowest bit
// carries into the sign bit exactly when every exponent bit is set, and never into the other half.
template <typename T>
struct Half_bits;
template <>
struct Half_bits<__half> {
  static constexpr uint32_t kExp = 0x7c00u, kExpLow = 0x0400u;  // 5 exponent bits
};
template <>
struct Half_bits<__nv_bfloat16> {
  static constexpr uint32_t kExp = 0x7f80u, kExpLow = 0x0080u;  // 8 exponent bits
};
template <typename T>
__device__ __forceinline__ uint32_t nonfinite_halves(uint32_t pair) {
  constexpr uint32_t kExp2 = Half_bits<T>::kExp * 0x10001u, kLow2 = Half_bits<T>::kExpLow * 0x10001u;
  return ((pair & kExp2) + kLow2) & 0x80008000u;
}
// The register with its non-finite halves replaced by +0.
template <typename T>
__device__ __forceinline__ uint32_t zero_nonfinite(uint32_t pair) {
  return pair & ~((nonfinite_halves<T>(pair) >> 15) * 0xffffu);
}

// Asynchronously copies rows [row0, row0 + kRows) x kCols of a row-major global matrix
// (row stride in elements, 16-byte aligned rows) into a swizzled shared tile; rows at or
// past `row_end` are zero-filled. All kThreads threads of the CTA take part.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* gmem, int64_t row_stride, int row0, int row_end,
                                                int tid) {
  constexpr int kChunks = kCols / 8;
  #pragma unroll
  for (int idx = tid; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool valid = row0 + r < row_end;
    const T* src = gmem + (valid ? (row0 + r) * row_stride + c : 0);
    cp_async_16(smem_addr(tile + Swizzled<kCols>::offset(r, c)), src, valid);
  }
}

// Writes a 16-bit value pair into a swizzled [kRows][kCols] shared tile at (row, col), col even.
template <int kCols, typename T>
__device__ __forceinline__ void store_pair(T* tile, int row, int col, uint32_t pair) {
  st_shared_b32(smem_addr(tile + Swizzled<kCols>::offset(row, col)), pair);
}

// acc[kNT][4] += A (16 rows from a_row0, depth kK) x B (depth kK, 8 * kNT columns from
// b_col0), both from swizzled shared tiles. kATrans: A is stored [k][m] (read with .trans);
// kBTrans: B is stored [k][n] (read with .trans), else [n][k]. kAPitch / kBPitch are the
// stored tiles' row lengths.
template <int kNT, int kK, bool kATrans, bool kBTrans, int kAPitch, int kBPitch, typename T>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[kNT][4], const T* sA, int a_row0, const T* sB, int b_col0,
                                             int lane) {
  static_assert(kNT % 2 == 0 && kK % 16 == 0, "whole 16 x 16 B fragments");
  #pragma unroll
  for (int k0 = 0; k0 < kK; k0 += 16) {
    uint32_t a[4];
    const RowCol ap = kATrans ? ldm_a_trans(lane, a_row0, k0) : ldm_a(lane, a_row0, k0);
    const uint32_t a_addr = smem_addr(sA + Swizzled<kAPitch>::offset(ap.row, ap.col));
    if constexpr (kATrans) ldmatrix_x4_trans(a, a_addr); else ldmatrix_x4(a, a_addr);
    #pragma unroll
    for (int nt = 0; nt < kNT; nt += 2) {
      uint32_t b[4];
      const RowCol bp = kBTrans ? ldm_b_trans(lane, k0, b_col0 + nt * 8) : ldm_b(lane, k0, b_col0 + nt * 8);
      const uint32_t b_addr = smem_addr(sB + Swizzled<kBPitch>::offset(bp.row, bp.col));
      if constexpr (kBTrans) ldmatrix_x4_trans(b, b_addr); else ldmatrix_x4(b, b_addr);
      mma_16816<T>(acc[nt], a, b[0], b[1]);
      mma_16816<T>(acc[nt + 1], a, b[2], b[3]);
    }
  }
}

// The A fragments of 16 rows (from row0) x kK columns of a swizzled [rows][kPitch] tile.
template <int kK, int kPitch, typename T>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[kK / 16][4], const T* sA, int row0, int lane) {
  #pragma unroll
  for (int k0 = 0; k0 < kK; k0 += 16) {
    const RowCol ap = ldm_a(lane, row0, k0);
    ldmatrix_x4(a[k0 / 16], smem_addr(sA + Swizzled<kPitch>::offset(ap.row, ap.col)));
  }
}

// As warp_gemm_ss with A already in registers: a[kK / 16][4] fragments (the forward's Q, held
// for the whole key loop, and its P, converted from the score accumulators without a round
// trip through shared memory). kZeroNonFiniteB: B's inf / NaN elements count as 0 (the
// forward's P V in a tile whose V has some; the caller adds their exact contribution).
template <int kNT, int kK, bool kBTrans, int kBPitch, bool kZeroNonFiniteB = false, typename T>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[kNT][4], const uint32_t (&a)[kK / 16][4], const T* sB,
                                             int b_col0, int lane) {
  #pragma unroll
  for (int k0 = 0; k0 < kK; k0 += 16) {
    #pragma unroll
    for (int nt = 0; nt < kNT; nt += 2) {
      uint32_t b[4];
      const RowCol bp = kBTrans ? ldm_b_trans(lane, k0, b_col0 + nt * 8) : ldm_b(lane, k0, b_col0 + nt * 8);
      const uint32_t b_addr = smem_addr(sB + Swizzled<kBPitch>::offset(bp.row, bp.col));
      if constexpr (kBTrans) ldmatrix_x4_trans(b, b_addr); else ldmatrix_x4(b, b_addr);
      if constexpr (kZeroNonFiniteB) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) b[i] = zero_nonfinite<T>(b[i]);
      }
      mma_16816<T>(acc[nt], a[k0 / 16], b[0], b[1]);
      mma_16816<T>(acc[nt + 1], a[k0 / 16], b[2], b[3]);
    }
  }
}

// Accumulator tiles (16 x 8 each, columns 16k .. 16k + 15 from tiles 2k, 2k + 1) as the A
// fragments of the next mma: the m16n8 C layout of two adjacent tiles is the m16n8k16 A layout.
template <int kNT, typename T>
__device__ __forceinline__ void acc_to_a(const float (&acc)[kNT][4], uint32_t (&a)[kNT / 2][4]) {
  #pragma unroll
  for (int k = 0; k < kNT / 2; ++k) {
    a[k][0] = pack2<T>(acc[2 * k][0], acc[2 * k][1]);
    a[k][1] = pack2<T>(acc[2 * k][2], acc[2 * k][3]);
    a[k][2] = pack2<T>(acc[2 * k + 1][0], acc[2 * k + 1][1]);
    a[k][3] = pack2<T>(acc[2 * k + 1][2], acc[2 * k + 1][3]);
  }
}

}  // namespace phi::flash
