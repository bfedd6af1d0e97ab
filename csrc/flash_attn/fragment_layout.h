// Where each lane's data lives in the sm_80 tensor-core instructions the CUDA kernels use
// (mma.sync.m16n8k16 and ldmatrix.x4), and the shared-memory swizzle of the tiles they read.
// Plain index arithmetic, PHI_HOST_DEVICE: the kernels compute their addresses with these
// functions, and csrc/tests/flash_fragment_test.cpp runs the same functions against an
// emulation of ldmatrix / mma written from the PTX ISA, so the layout logic is checked on CPU.
#pragma once
#include "common/macros.h"

namespace phi::flash {

// A tile of kCols 16-bit elements per row in shared memory, 16-byte chunks XOR-swizzled by
// row: chunk c of row r is stored at chunk c ^ (r % 8). The 8 rows one ldmatrix phase reads
// (same logical chunk, consecutive rows) then hit 8 different bank groups: conflict-free.
template <int kCols>
struct Swizzled {
  static_assert(kCols % 64 == 0, "rows must hold at least 8 chunks of 8 elements");
  PHI_HOST_DEVICE static int offset(int row, int col) {
    return row * kCols + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
  }
};

struct RowCol {
  int row, col;
};

// ldmatrix.x4 reads four 8x8 matrices; lane L gives the address of row L % 8 of matrix L / 8.
// These return, for `lane`, the (row, col) in the stored tile of that row's first element, so
// that the four result registers are the operand fragments of mma.m16n8k16:
//
// A (16 x 16 at rows m0, k-cols k0) stored [m][k]: registers a0..a3 = (m0.., k0), (m0+8.., k0),
// (m0.., k0+8), (m0+8.., k0+8). ldmatrix without .trans.
PHI_HOST_DEVICE RowCol ldm_a(int lane, int m0, int k0) {
  const int r = lane & 7, i = lane >> 3;
  return {m0 + r + (i & 1) * 8, k0 + (i >> 1) * 8};
}
// A stored transposed, [k][m] (P^T / dS^T read from a [m][n] tile): ldmatrix .trans.
PHI_HOST_DEVICE RowCol ldm_a_trans(int lane, int m0, int k0) {
  const int r = lane & 7, i = lane >> 3;
  return {k0 + r + (i >> 1) * 8, m0 + (i & 1) * 8};
}
// B (16 x 16: k-rows k0, two 8-wide n-tiles at n0, n0 + 8) stored [n][k] (K for Q K^T):
// registers = (b0, b1) of n-tile n0, then (b0, b1) of n-tile n0 + 8. ldmatrix without .trans.
PHI_HOST_DEVICE RowCol ldm_b(int lane, int k0, int n0) {
  const int r = lane & 7, i = lane >> 3;
  return {n0 + r + (i >> 1) * 8, k0 + (i & 1) * 8};
}
// B stored [k][n] (V for P V): ldmatrix .trans; same register order as ldm_b.
PHI_HOST_DEVICE RowCol ldm_b_trans(int lane, int k0, int n0) {
  const int r = lane & 7, i = lane >> 3;
  return {k0 + r + (i & 1) * 8, n0 + (i >> 1) * 8};
}

// Accumulator element e (0..3) of a lane in a 16 x 8 mma tile: rows lane/4 and lane/4 + 8,
// columns 2 * (lane % 4) + {0, 1}. A lane holds two rows ("row halves" e / 2 = 0, 1).
PHI_HOST_DEVICE int acc_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
PHI_HOST_DEVICE int acc_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }

}  // namespace phi::flash
