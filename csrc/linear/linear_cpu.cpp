// Linear for a few rows, CPU kernel: out = x W^T + b as a register-blocked GEMV. Contract:
// linear.h. No torch headers here; the glue is linear_ops.cpp. Compiled once per CPU capability
// by csrc/cpu_isa (which sets the vector width, the block shapes and the target).
//
// Why: with one row (a decoding step) the work is one pass over W, and the time is the time to
// stream W's bytes; the loop reads each of them once per call, whatever the number of rows:
//   * W is cut into panels of kPanelRows rows (OpenMP over panels for a large product; below
//     kParallelMacs the call stays on the calling thread, since forking a team for a small layer
//     costs more than the layer, and on a busy machine the join waits for a descheduled thread);
//   * within a panel, x's rows go in tiles of Mt = 4, 2 or 1 rows, and a block of R weight rows
//     is dotted with the tile's rows at once: each W vector is loaded (and converted to fp32)
//     once and multiplied into Mt accumulators, so a batch of rows costs little more W traffic
//     than one row (the panel stays in L1/L2 while the tiles pass over it);
//   * the R * Mt accumulators are independent registers, enough to hide the FMA latency.
//     (R, Mt) per ISA, chosen so the accumulators, Mt x vectors and a W vector fit the register
//     file without spills (checked with objdump -d): AVX2 (8, 1), (4, 2), (3, 4): 8-12 of 16
//     YMM; AVX-512 (8, 1), (8, 2), (4, 4): 8-16 of 32 ZMM. Measured on an AMD EPYC (Zen 4):
//     one row streams W at L2 / L3 / DRAM speed on both ISAs; 4 rows reach the FMA throughput.
// Tails: the last k % kVecFloats columns are summed as scalars, the panel's last rows (fewer
// than R) go one weight row at a time, x's last rows in smaller tiles.
// fp16 / bf16: x is converted to fp32 once per call (a scratch buffer of rows * in_features),
// W a vector at a time as it is loaded; sums in fp32, rounded once to the dtype in out.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/cpu_lane_sum.h"
#include "common/cpu_types.h"
#include "linear/linear.h"
#include "linear/linear_launch.h"

// kVecFloats: fp32 lanes of one register (AVX-512 16, AVX2 8, SSE 4). kBlockRows1/2/4: weight
// rows R of a block for tiles of 1, 2 and 4 rows of x, sized so that the R * Mt accumulators,
// Mt x vectors and one W vector (+ a conversion temporary) fit the register file (see the
// wrappers in csrc/cpu_isa), and R stays <= 8: each weight row is a pointer in a general
// register, and 16 of them run out of the 15 usable GPRs (pointers reloaded from the stack).
#ifndef PHI_LINEAR_VEC_FLOATS
#define PHI_LINEAR_VEC_FLOATS 16
#define PHI_LINEAR_BLOCK_ROWS_1 8
#define PHI_LINEAR_BLOCK_ROWS_2 8
#define PHI_LINEAR_BLOCK_ROWS_4 4
#endif

namespace phi {
namespace {

constexpr int kVecFloats = PHI_LINEAR_VEC_FLOATS;

template <int Mt>
constexpr int block_rows() {
  return Mt == 4 ? PHI_LINEAR_BLOCK_ROWS_4 : Mt == 2 ? PHI_LINEAR_BLOCK_ROWS_2 : PHI_LINEAR_BLOCK_ROWS_1;
}
// Weight rows per panel: whole blocks for every tile height.
constexpr int kPanelRows = std::lcm(std::lcm(block_rows<1>(), block_rows<2>()), block_rows<4>());
// From this many multiply-adds a call uses the OpenMP team: 1M, a 4 MiB fp32 weight for one row
// (phi-1.5's projections and phi tiny's 8 MiB lm_head qualify, its layers' 1 MiB weights do
// not). Measured on a 2-core AMD EPYC: phi tiny's lm_head takes ~150 us on one thread, ~75 us on
// two when both cores are free, and greedy decoding went from 1.6-1.7x to 2.0x transformers'
// generate with this threshold instead of 4M. The price, as for every torch op that forks: on a
// machine whose other core is busy, a 2-thread region can wait ~8 ms for its descheduled thread.
constexpr double kParallelMacs = double(1 << 20);

// One register of fp32, unaligned, allowed to alias anything (plain vector moves).
typedef float VecN __attribute__((vector_size(4 * kVecFloats), aligned(4), may_alias));
typedef uint16_t U16N __attribute__((vector_size(2 * kVecFloats), aligned(2), may_alias));
typedef uint32_t U32N __attribute__((vector_size(4 * kVecFloats)));

inline VecN load_vec(const float* p) { return *reinterpret_cast<const VecN*>(p); }

// kVecFloats values at p as fp32. bf16 is the top half of an fp32: widen and shift. fp16 uses
// the F16C / AVX-512 conversion where the build has it, lane by lane on the baseline. (The
// widening is spelled with intrinsics: GCC lowers a 16-lane __builtin_convertvector as two
// 8-lane halves and an insert. The AVX-512 ones are the maskz forms with every lane set: the
// same instructions, without GCC 12's false "may be used uninitialized" about the unmasked
// forms' undefined pass-through operand.)
template <typename T>
inline VecN load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load_vec(p);
  } else if constexpr (std::is_same_v<T, BFloat16>) {
#if PHI_LINEAR_VEC_FLOATS == 16
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const U32N wide = reinterpret_cast<U32N>(_mm512_maskz_cvtepu16_epi32(__mmask16(0xffff), h));
#elif PHI_LINEAR_VEC_FLOATS == 8
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const U32N wide = reinterpret_cast<U32N>(_mm256_cvtepu16_epi32(h));
#else
    const U32N wide = __builtin_convertvector(*reinterpret_cast<const U16N*>(p), U32N);
#endif
    return reinterpret_cast<VecN>(wide << 16);
  } else {
#if PHI_LINEAR_VEC_FLOATS == 16
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return reinterpret_cast<VecN>(_mm512_maskz_cvtph_ps(__mmask16(0xffff), h));
#elif PHI_LINEAR_VEC_FLOATS == 8
    return reinterpret_cast<VecN>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    VecN v;
    for (int i = 0; i < kVecFloats; ++i) v[i] = to_float(p[i]);
    return v;
#endif
  }
}


// What every block of one call reads: x as fp32 rows, W, bias and out.
template <typename T>
struct Gemv {
  const float* x;  // (rows, k) fp32, row stride x_stride
  int64_t x_stride;
  const T* w;      // (n, k) contiguous
  const T* bias;   // (n,) or nullptr
  T* out;          // (rows, n) contiguous
  int64_t rows, n, k;
};

// sums[r][m] = W[n0 + r, :] . x[m0 + m, :] for r < R, m < Mt: R * Mt accumulator registers, each
// W vector loaded once for the Mt rows of x.
template <typename T, int R, int Mt>
inline void dot_block(const Gemv<T>& g, int64_t n0, int64_t m0, float (&sums)[R][Mt]) {
  const int64_t k_len = g.k;
  const T* w = g.w + n0 * k_len;
  const float* xs[Mt];
  for (int m = 0; m < Mt; ++m) xs[m] = g.x + (m0 + m) * g.x_stride;
  VecN acc[R][Mt];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < Mt; ++m) acc[r][m] = VecN{};
  }
  int64_t k = 0;
  for (; k + kVecFloats <= k_len; k += kVecFloats) {
    VecN xv[Mt];
    for (int m = 0; m < Mt; ++m) xv[m] = load_vec(xs[m] + k);
    for (int r = 0; r < R; ++r) {
      const VecN wv = load_as_float(w + r * k_len + k);
      for (int m = 0; m < Mt; ++m) acc[r][m] += wv * xv[m];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < Mt; ++m) {
      float s = lane_sum(acc[r][m]);
      for (int64_t j = k; j < k_len; ++j) s += to_float(w[r * k_len + j]) * xs[m][j];
      sums[r][m] = s;
    }
  }
}

template <typename T, int R, int Mt>
inline void store_block(const Gemv<T>& g, int64_t n0, int64_t m0, const float (&sums)[R][Mt]) {
  for (int r = 0; r < R; ++r) {
    const float b = g.bias != nullptr ? to_float(g.bias[n0 + r]) : 0.f;
    for (int m = 0; m < Mt; ++m) g.out[(m0 + m) * g.n + n0 + r] = from_float<T>(sums[r][m] + b);
  }
}

// Weight rows [n0, n1) against x rows [m0, m0 + Mt).
template <typename T, int Mt>
void panel_tile(const Gemv<T>& g, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int R = block_rows<Mt>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    float sums[R][Mt];
    dot_block<T, R, Mt>(g, n, m0, sums);
    store_block<T, R, Mt>(g, n, m0, sums);
  }
  for (; n < n1; ++n) {
    float sums[1][Mt];
    dot_block<T, 1, Mt>(g, n, m0, sums);
    store_block<T, 1, Mt>(g, n, m0, sums);
  }
}

// Every row of x against weight rows [n0, n1): tiles of 4, then 2, then 1 row.
template <typename T>
void panel(const Gemv<T>& g, int64_t n0, int64_t n1) {
  int64_t m0 = 0;
  for (; m0 + 4 <= g.rows; m0 += 4) panel_tile<T, 4>(g, n0, n1, m0);
  if (m0 + 2 <= g.rows) {
    panel_tile<T, 2>(g, n0, n1, m0);
    m0 += 2;
  }
  if (m0 < g.rows) panel_tile<T, 1>(g, n0, n1, m0);
}

// x as fp32 rows: in place for fp32, else converted once into a per-thread buffer that persists
// across calls (decoding calls this for every layer of every token).
template <typename T>
const float* x_as_float(const Linear_params& p, int64_t* stride) {
  const T* x = static_cast<const T*>(p.x_ptr);
  if constexpr (std::is_same_v<T, float>) {
    *stride = p.x_row_stride;
    return x;
  } else {
    thread_local std::vector<float> buffer;
    const size_t need = size_t(p.rows) * size_t(p.in_features);
    if (buffer.size() < need) buffer.resize(need);
    for (int64_t m = 0; m < p.rows; ++m) {
      const T* row = x + m * p.x_row_stride;
      float* dst = buffer.data() + m * p.in_features;
      for (int64_t j = 0; j < p.in_features; ++j) dst[j] = to_float(row[j]);
    }
    *stride = p.in_features;
    return buffer.data();
  }
}

template <typename T>
void linear_typed(const Linear_params& p) {
  if (p.rows == 0 || p.out_features == 0) return;
  Gemv<T> g;
  g.x = x_as_float<T>(p, &g.x_stride);
  g.w = static_cast<const T*>(p.w_ptr);
  g.bias = static_cast<const T*>(p.bias_ptr);
  g.out = static_cast<T*>(p.out_ptr);
  g.rows = p.rows;
  g.n = p.out_features;
  g.k = p.in_features;
  const int64_t panels = (g.n + kPanelRows - 1) / kPanelRows;
  const bool parallel = double(g.rows) * double(g.n) * double(g.k) >= kParallelMacs;  // no int64 overflow
  #pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < panels; ++i) {
    const int64_t n0 = i * kPanelRows;
    panel<T>(g, n0, std::min(g.n, n0 + kPanelRows));
  }
}

}  // namespace

void linear_cpu(const Linear_params& p) {
  switch (p.dtype) {
    case DType::kFloat32: linear_typed<float>(p); break;
    case DType::kFloat16: linear_typed<Half>(p); break;
    case DType::kBFloat16: linear_typed<BFloat16>(p); break;
  }
}

}  // namespace phi
