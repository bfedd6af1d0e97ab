// Flash attention, CPU kernels: the vector and tile primitives (one vector type of the ISA's
// width, exp2, the register-blocked tile product, tile loads), sized by the ISA this header is
// compiled for. Only flash_attn_cpu.cpp includes it, and that file is compiled once per
// capability by csrc/cpu_isa (which sets PHI_CPU_VEC_FLOATS / PHI_CPU_GEMM_ROWS and the
// target), so everything here sits in an anonymous namespace: each capability's copy stays its
// own, and the linker can never hand an AVX-512 body to an AVX2 caller.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "common/cpu_lane_sum.h"
#include "common/cpu_types.h"

// kVecFloats: fp32 lanes of one register (AVX-512 16, AVX2 8, SSE 4). kGemmRows: rows of the
// tile product's register block: kGemmRows x 2 accumulators + 2 B vectors + 1 broadcast must
// fit the register file without spilling: AVX-512 12 x 2 (27 of 32 ZMM), AVX2 6 x 2 (15 of 16
// YMM, the classic 6 x 16 BLAS kernel), SSE 4 x 2 (11 of 16 XMM).
#ifndef PHI_CPU_VEC_FLOATS
#define PHI_CPU_VEC_FLOATS 16
#define PHI_CPU_GEMM_ROWS 12
#endif

namespace phi {
namespace {

constexpr int kVecFloats = PHI_CPU_VEC_FLOATS;
constexpr int kGemmRows = PHI_CPU_GEMM_ROWS;
constexpr int kGemmVecs = 2;
constexpr int kGemmCols = kGemmVecs * kVecFloats;  // every B / C row count of a tile product is a multiple

// One register of fp32 (and its int32 twin), unaligned, allowed to alias float: loads and
// stores through it are plain vector moves. (Going through memcpy instead makes GCC keep the
// accumulators on the stack.) A vector wider than the ISA's register would be split by GCC
// through the stack: every vector here is exactly one register.
typedef float VecN __attribute__((vector_size(4 * kVecFloats), aligned(4), may_alias));
typedef int32_t IVecN __attribute__((vector_size(4 * kVecFloats), aligned(4), may_alias));

inline VecN load_vec(const float* p) { return *reinterpret_cast<const VecN*>(p); }
inline void store_vec(float* p, VecN v) { *reinterpret_cast<VecN*>(p) = v; }
inline VecN splat(float x) { return VecN{} + x; }

// Lane numbers 0, 1, ..., kVecFloats - 1.
inline IVecN lane_index() {
  IVecN l;
  for (int i = 0; i < kVecFloats; ++i) l[i] = i;
  return l;
}

// The kVecFloats values at p as fp32 (T is float, Half or BFloat16).
template <typename T>
inline VecN load_as_float(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return load_vec(reinterpret_cast<const float*>(p));
  } else {
    VecN v;
    for (int i = 0; i < kVecFloats; ++i) v[i] = to_float(p[i]);
    return v;
  }
}

// 2^x for x <= 0 (scores relative to the row max), a register at a time. Written with vector
// types because GCC will not vectorize libm's exp2f, nor an inline polynomial with float->int
// conversions, under default (trapping) math. Cephes' exp2f polynomial on [-0.5, 0.5],
// relative error ~1e-7. The clamp maps NaN and large negatives to -126, keeping the int
// conversions in range; a NaN input is given back as NaN (a NaN score in q or a visible key
// must reach the row's output, flash_math.h's rule; callers select 0 for masked scores).
inline VecN exp2_nonpositive(VecN x) {
  const VecN in = x;
  x = x > -126.f ? x : -126.f;
  x = x < 0.f ? x : 0.f;
  const IVecN n = __builtin_convertvector(x - 0.5f, IVecN);  // trunc toward 0: x - n in [-0.5, 0.5]
  const VecN f = x - __builtin_convertvector(n, VecN);
  VecN p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const VecN r = p * reinterpret_cast<VecN>((n + 127) << 23);
  return in == in ? r : in;
}

inline float exp2_nonpositive(float x) { return exp2_nonpositive(splat(x))[0]; }

// ----------------------------------------------------------------------------- tile product
//
// C[r][c] = init(C[r][c]) + sum_k A(r, k) * B[k * ldb + c], A(r, k) = a[r * a_row + k * a_col],
// for r < rows, c < cols (a multiple of kGemmCols), k < depth. A is read one scalar at a time
// (broadcast), so it may be stored transposed at no cost; B and C rows are read as vectors.
// init: kZero C = AB; kAdd C += AB; kScaleRows C = row_scale[r] * C + AB (the online softmax's
// rescale of the output, done while the block is in registers).
//
// A band (a tile that the attention mask cuts diagonally) gives each row r of C a range
// [band_begin[r], band_end[r]) (empty when begin >= end) and lets a register block skip what
// lies outside its rows' ranges: kColumns, C's row r is needed in those columns only (blocks
// of kGemmCols columns that no row of the block needs are left unwritten); kDepth, A(r, k) is
// zero outside that k range (the block's k loop covers the union of its rows' ranges, which
// leaves C exactly as the full product would, finite B assumed). On the diagonal tile of a causal
// mask either skips about 40% of the multiply-adds.

enum class C_init { kZero, kAdd, kScaleRows };
enum class Band { kNone, kColumns, kDepth };

struct Tile_operands {
  const float* a;
  int a_row, a_col;
  const float* b;
  int ldb;
  float* c;
  int ldc;
  int depth;
  const float* row_scale;           // kScaleRows only
  const int* band_begin = nullptr;  // per row of C, Band::kColumns / kDepth only (null: no band)
  const int* band_end = nullptr;
  float* col_max = nullptr;  // if set: col_max[c] = max(col_max[c], max_r C[r][c]), NaN skipped (flash_math.h)
};

// One R x kGemmCols block of C at (r0, c0), its accumulators in registers, over k in [k0, k1).
template <int R, C_init kInit>
inline void gemm_block(const Tile_operands& t, int r0, int c0, int k0, int k1) {
  // C's block and the scale in locals: a store through VecN (may_alias) could change any
  // field of t as far as GCC knows, and it reloaded t.c and t.ldc after every store.
  const ptrdiff_t ldc = t.ldc;
  float* const c_block = t.c + r0 * ldc + c0;
  const float* const row_scale = t.row_scale;
  float* const col_max = t.col_max;
  VecN acc[R][kGemmVecs];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kGemmVecs; ++v) {
      float* c = c_block + r * ldc + kVecFloats * v;
      if constexpr (kInit == C_init::kZero) acc[r][v] = VecN{};
      if constexpr (kInit == C_init::kAdd) acc[r][v] = load_vec(c);
      if constexpr (kInit == C_init::kScaleRows) acc[r][v] = load_vec(c) * row_scale[r0 + r];
    }
  }
  // Pointers stepped along k and 64-bit row offsets hoisted out of the loop: each broadcast
  // is then one base + index * 4 load (int indices cost a sign extension and an add per
  // broadcast and ran out of integer registers).
  const ptrdiff_t a_row = t.a_row, a_col = t.a_col, ldb = t.ldb;
  const float* __restrict__ ak = t.a + r0 * a_row + k0 * a_col;
  const float* __restrict__ bk = t.b + c0 + k0 * ldb;
  for (int k = k0; k < k1; ++k, ak += a_col, bk += ldb) {
    VecN bv[kGemmVecs];
    for (int v = 0; v < kGemmVecs; ++v) bv[v] = load_vec(bk + kVecFloats * v);
    for (int r = 0; r < R; ++r) {
      const float ar = ak[r * a_row];
      for (int v = 0; v < kGemmVecs; ++v) acc[r][v] += ar * bv[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kGemmVecs; ++v) store_vec(c_block + r * ldc + kVecFloats * v, acc[r][v]);
  }
  if (col_max != nullptr) {  // the forward's tile max, taken while C is in registers
    for (int v = 0; v < kGemmVecs; ++v) {
      VecN m = load_vec(col_max + c0 + kVecFloats * v);
      for (int r = 0; r < R; ++r) m = acc[r][v] > m ? acc[r][v] : m;
      store_vec(col_max + c0 + kVecFloats * v, m);
    }
  }
}

// The last rows % kGemmRows rows: a smaller block of exactly that many rows.
template <C_init kInit, int R = kGemmRows - 1>
inline void gemm_tail(const Tile_operands& t, int r0, int c0, int rest, int k0, int k1) {
  if constexpr (R > 0) {
    if (rest == R) return gemm_block<R, kInit>(t, r0, c0, k0, k1);
    gemm_tail<kInit, R - 1>(t, r0, c0, rest, k0, k1);
  }
}

// The union of the band ranges of rows [r0, r1) as [*lo, *hi) (*lo >= *hi when all are empty).
inline void band_union(const Tile_operands& t, int r0, int r1, int* lo, int* hi) {
  *lo = 1 << 30;
  *hi = 0;
  for (int r = r0; r < r1; ++r) {
    if (t.band_begin[r] >= t.band_end[r]) continue;
    *lo = std::min(*lo, t.band_begin[r]);
    *hi = std::max(*hi, t.band_end[r]);
  }
}

// Rows [r0, r0 + n) (n <= kGemmRows) of column block c0, within the band.
template <C_init kInit, Band kBand>
inline void gemm_rows(const Tile_operands& t, int r0, int n, int c0) {
  int k0 = 0, k1 = t.depth;
  if constexpr (kBand != Band::kNone) {
    int lo, hi;
    band_union(t, r0, r0 + n, &lo, &hi);
    if constexpr (kBand == Band::kColumns) {
      if (std::max(lo, c0) >= std::min(hi, c0 + kGemmCols)) return;
    } else {
      k0 = std::min(lo, t.depth);
      k1 = std::max(k0, std::min(hi, t.depth));
    }
  }
  if (n == kGemmRows) return gemm_block<kGemmRows, kInit>(t, r0, c0, k0, k1);
  gemm_tail<kInit>(t, r0, c0, n, k0, k1);
}

template <C_init kInit, Band kBand = Band::kNone>
void tile_gemm(const Tile_operands& t, int rows, int cols) {
  if constexpr (kBand != Band::kNone) {
    if (t.band_begin == nullptr) return tile_gemm<kInit>(t, rows, cols);  // no band given: the whole product
  }
  for (int c0 = 0; c0 < cols; c0 += kGemmCols) {
    for (int r0 = 0; r0 < rows; r0 += kGemmRows) gemm_rows<kInit, kBand>(t, r0, std::min(kGemmRows, rows - r0), c0);
  }
}

// ----------------------------------------------------------------------------- tile loads

// The rows a kernel copies are heads * head_dim elements apart (8 KiB for phi-1.5: a page per
// row), which the hardware prefetchers do not follow, so every row was a cache miss waited on
// in turn. The copy loops ask for the row kPrefetchRows ahead themselves (the first
// kPrefetchRows rows up front), keeping that many rows' misses in flight.
constexpr int kPrefetchRows = 8;

template <int kWrite = 0, typename T>
inline void prefetch_row(const T* row, int d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int off = 0; off < d * int(sizeof(T)); off += 64) __builtin_prefetch(p + off, kWrite);
}

// Rows [0, kPrefetchRows) of a strided copy up front; then prefetch_ahead(r) before row r.
template <int kWrite = 0, typename T>
inline void prefetch_first_rows(const T* src, int64_t stride, int rows, int d) {
  for (int r = 0; r < std::min(rows, kPrefetchRows); ++r) prefetch_row<kWrite>(src + r * stride, d);
}
template <int kWrite = 0, typename T>
inline void prefetch_ahead(const T* src, int64_t stride, int r, int rows, int d) {
  if (r + kPrefetchRows < rows) prefetch_row<kWrite>(src + (r + kPrefetchRows) * stride, d);
}

// Copies `rows` rows of `d` elements (row stride `stride`) into a zero-padded fp32 tile with
// row pitch `pitch`; rows [rows, padded_rows) are zero. Returns whether every value is finite
// (checked only with kCheckFinite: x * 0 is 0 for finite x and NaN otherwise).
template <typename T, bool kCheckFinite = false>
bool load_tile(const T* __restrict__ src, int64_t stride, int rows, int d, float* __restrict__ dst, int pitch,
               int padded_rows) {
  float nonfinite = 0.f;
  prefetch_first_rows(src, stride, rows, d);
  for (int r = 0; r < rows; ++r) {
    prefetch_ahead(src, stride, r, rows, d);
    const T* __restrict__ s = src + r * stride;
    float* __restrict__ o = dst + r * pitch;
    if constexpr (kCheckFinite) {
      #pragma omp simd reduction(+ : nonfinite)
      for (int c = 0; c < d; ++c) {
        o[c] = to_float(s[c]);
        nonfinite += o[c] * 0.f;
      }
    } else {
      #pragma omp simd
      for (int c = 0; c < d; ++c) o[c] = to_float(s[c]);
    }
    std::fill(dst + r * pitch + d, dst + (r + 1) * pitch, 0.f);
  }
  std::fill(dst + rows * pitch, dst + padded_rows * pitch, 0.f);
  return nonfinite == 0.f;
}

// The first d columns of `rows` rows of an fp32 tile (row pitch `pitch`) into rows of T with
// row stride `stride` (the kernels' dq / dk / dv). Vectorized: the output never aliases the
// scratch tile (as a scalar loop this copy was a tenth of the backward at seqlen 128).
template <typename T>
void store_tile(const float* __restrict__ src, int pitch, int rows, int d, T* __restrict__ dst, int64_t stride) {
  prefetch_first_rows<1>(dst, stride, rows, d);
  for (int r = 0; r < rows; ++r) {
    prefetch_ahead<1>(dst, stride, r, rows, d);
    const float* __restrict__ s = src + r * pitch;
    T* __restrict__ o = dst + r * stride;
    #pragma omp simd
    for (int c = 0; c < d; ++c) o[c] = from_float<T>(s[c]);
  }
}

// dst[c * rows + r] = src[r * pitch + c] for c < pitch: a padded tile transposed, 16 rows at
// a time so that every run of stores fills a cache line. (Row by row, consecutive stores are
// rows * 4 bytes apart, a multiple of 4 KiB for a long sequence: all in one L1 set, which
// made the backward's transposes cost a tenth of its time.)
inline void transpose(const float* __restrict__ src, int rows, int pitch, float* __restrict__ dst) {
  constexpr int kRun = 16;
  int r0 = 0;
  for (; r0 + kRun <= rows; r0 += kRun) {
    for (int c = 0; c < pitch; ++c) {
      for (int r = r0; r < r0 + kRun; ++r) dst[c * rows + r] = src[r * pitch + c];
    }
  }
  for (int r = r0; r < rows; ++r) {
    for (int c = 0; c < pitch; ++c) dst[c * rows + r] = src[r * pitch + c];
  }
}

}  // namespace
}  // namespace phi
