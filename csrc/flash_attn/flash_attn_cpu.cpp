// Flash attention, CPU kernels: the flash-attention 2 algorithm with fp32 tiles in L1/L2
// instead of shared memory, and the same masking / online-softmax / LSE / dropout rules as
// the CUDA kernels (flash_math.h). No torch headers here; the glue is flash_attn_ops.cpp.
//
// Scores are kept transposed, S^T = K Q^T (keys x queries): then every product (S^T, O += P V,
// and the backward's dP^T = V dO^T, dV += P^T dO, dK += dS^T Q, dQ += dS K) reads its B operand
// as contiguous rows of an untransposed tile, the softmax statistics of the queries are
// vectors along a row of S^T, and only Q and dO get transposed, once per head. One
// register-blocked micro-kernel (tile_gemm) does every product, its accumulator block sized for
// the ISA it is compiled for (8 x 32 fp32 in 16 AVX-512 registers, each loaded B vector feeding
// 8 FMAs; 4 x 16 in 8 AVX2 registers; see kGemmRows). Tiles are zero-padded
// (head_dim to a multiple of 32), and masked or padded scores get probability 0, so padding
// never reaches an output.
//
// Forward: OpenMP over (batch, head, block of kBlockM query rows); the task streams the
// visible key blocks once with a running max and sum per row (memory O(seqlen)).
// Backward: OpenMP over (batch, kv head): a task owns its dk/dv rows (the GQA heads of a
// group accumulate into them in turn) and its heads' dq rows, so no atomics: deterministic.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <exception>
#include <vector>

#include "common/cpu_types.h"
#include "flash_attn/flash.h"
#include "flash_attn/flash_launch.h"

namespace phi {
namespace {

constexpr int kBlockM = 64;  // queries per tile
constexpr int kBlockN = 64;  // keys per tile
constexpr int kMicroRows = 8;
constexpr int kMicroCols = 32;

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// 16 floats, unaligned, allowed to alias float: loads and stores through it are plain vector
// moves. (Going through memcpy instead makes GCC keep the accumulators on the stack: 4.5x slower.)
typedef float Vec16 __attribute__((vector_size(64), aligned(4), may_alias));

// The register block of tile_gemm, sized for the ISA this file is compiled for (the wrappers in
// csrc/cpu_isa set these): kGemmRows x kGemmVecs vectors of kVecFloats fp32 accumulators plus
// kGemmVecs B vectors must fit the register file: AVX-512 8 x 2 ZMM (+2) of 32; AVX2 4 x 2 YMM
// (+2) of 16; SSE 4 x 2 XMM (+2) of 16. (A Vec16 block on AVX2 needs 32 YMM: it spills, 20x slower.)
#ifndef PHI_CPU_VEC_FLOATS
#define PHI_CPU_VEC_FLOATS 16
#define PHI_CPU_GEMM_ROWS 8
#endif
constexpr int kVecFloats = PHI_CPU_VEC_FLOATS;
constexpr int kGemmRows = PHI_CPU_GEMM_ROWS;
constexpr int kGemmVecs = 2;  // (8 x 1 on AVX2 measured slower than 4 x 2)
constexpr int kGemmCols = kGemmVecs * kVecFloats;
static_assert(kMicroRows % kGemmRows == 0 && kMicroCols % kGemmCols == 0, "register blocks tile the padded tiles");
typedef float VecN __attribute__((vector_size(4 * kVecFloats), aligned(4), may_alias));

// C[r][c] (+)= sum_k A(r, k) * B[k * ldb + c], A(r, k) = a[r * a_row + k * a_col], for r < rows,
// c < cols, k < depth; rows a multiple of kMicroRows, cols of kMicroCols (tiles are padded).
// A is read one scalar at a time (broadcast), so it may be stored transposed at no cost; the
// accumulator block uses GCC vector types so that it stays in registers whatever the ISA.
template <bool kAccumulate>
void tile_gemm(const float* __restrict__ a, int a_row, int a_col, const float* __restrict__ b, int ldb,
               float* __restrict__ c, int ldc, int rows, int cols, int depth) {
  for (int r0 = 0; r0 < rows; r0 += kGemmRows) {
    for (int c0 = 0; c0 < cols; c0 += kGemmCols) {
      VecN acc[kGemmRows][kGemmVecs];
      for (int r = 0; r < kGemmRows; ++r) {
        for (int v = 0; v < kGemmVecs; ++v) {
          acc[r][v] = kAccumulate ? *reinterpret_cast<const VecN*>(c + (r0 + r) * ldc + c0 + kVecFloats * v) : VecN{};
        }
      }
      const float* arow = a + r0 * a_row;
      for (int k = 0; k < depth; ++k) {
        VecN bv[kGemmVecs];
        for (int v = 0; v < kGemmVecs; ++v) bv[v] = *reinterpret_cast<const VecN*>(b + k * ldb + c0 + kVecFloats * v);
        for (int r = 0; r < kGemmRows; ++r) {
          const float ar = arow[r * a_row + k * a_col];
          for (int v = 0; v < kGemmVecs; ++v) acc[r][v] += ar * bv[v];
        }
      }
      for (int r = 0; r < kGemmRows; ++r) {
        for (int v = 0; v < kGemmVecs; ++v) {
          *reinterpret_cast<VecN*>(c + (r0 + r) * ldc + c0 + kVecFloats * v) = acc[r][v];
        }
      }
    }
  }
}

typedef int32_t IVec16 __attribute__((vector_size(64)));

inline Vec16 load16(const float* p) { return *reinterpret_cast<const Vec16*>(p); }
inline void store16(float* p, Vec16 v) { *reinterpret_cast<Vec16*>(p) = v; }

// 2^x for x <= 0 (scores relative to the row max), 16 lanes at a time. Written with vector
// types because GCC will not vectorize libm's exp2f, nor an inline polynomial with float->int
// conversions, under default (trapping) math. Cephes' exp2f polynomial on [-0.5, 0.5],
// relative error ~1e-7. The clamp maps NaN and large negatives to -126, keeping the int
// conversions in range; a NaN input is given back as NaN (a NaN score in q or a visible key
// must reach the row's output, flash_math.h's rule; callers select 0 for masked scores).
inline Vec16 exp2_nonpositive(Vec16 x) {
  const Vec16 in = x;
  x = x > -126.f ? x : -126.f;
  x = x < 0.f ? x : 0.f;
  const IVec16 n = __builtin_convertvector(x - 0.5f, IVec16);  // trunc toward 0: x - n in [-0.5, 0.5]
  const Vec16 f = x - __builtin_convertvector(n, Vec16);
  Vec16 p = 1.535336188319500e-4f + Vec16{};
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const Vec16 r = p * reinterpret_cast<Vec16>((n + 127) << 23);
  return in == in ? r : in;
}

inline float exp2_nonpositive(float x) { return exp2_nonpositive(x + Vec16{})[0]; }

// Copies `rows` rows of `d` elements (row stride `stride`) into a zero-padded fp32 tile with
// row pitch `pitch`; rows [rows, padded_rows) are zero. Returns whether every value is finite
// (checked only with kCheckFinite: x * 0 is 0 for finite x and NaN otherwise).
template <typename T, bool kCheckFinite = false>
bool load_tile(const T* __restrict__ src, int64_t stride, int rows, int d, float* __restrict__ dst, int pitch,
               int padded_rows) {
  float nonfinite = 0.f;
  for (int r = 0; r < rows; ++r) {
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

// An exception must not leave an OpenMP region (that is std::terminate: a bad_alloc or a
// length_error would abort the process): each task's body runs under run(), the first
// exception is kept, the remaining tasks are skipped, and rethrow() raises it on the calling
// thread once the region is over (the op then fails with a catchable error).
class Region_errors {
 public:
  template <typename F>
  bool run(F&& body) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return false;
    try {
      body();
      return true;
    } catch (...) {
      #pragma omp critical(phi_flash_region_errors)
      {
        if (!error_) error_ = std::current_exception();
      }
      failed_.store(true, std::memory_order_relaxed);
      return false;
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

// dst[c * rows + r] = src[r * pitch + c] for c < pitch: a padded tile transposed.
void transpose(const float* __restrict__ src, int rows, int pitch, float* __restrict__ dst) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < pitch; ++c) dst[c * rows + r] = src[r * pitch + c];
}

// Per-thread scratch that persists across calls (no allocation per call: decoding calls the
// forward with one query row, where a malloc per tile would cost more than the math).
float* scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// Below this many multiply-adds a call runs on the calling thread: forking OpenMP workers
// costs more than the work (a decoding step of a small model).
constexpr double kParallelMacs = 1 << 20;

// The queries (relative to r0, within [0, m)) that see key `col`: [*begin, *end).
inline void seeing_rows(const flash::Mask& mask, int col, int r0, int m, int* begin, int* end) {
  mask.row_range(col, col + 1, begin, end);
  *begin = std::clamp(*begin - r0, 0, m);
  *end = std::clamp(*end - r0, 0, m);
}

// A tile of at most kDirectRows query rows (a decoding step, or the tail of a sequence) is
// computed row by row: all of a row's scores at once (exact two-pass softmax), reading K and
// V in place. The tile path would pad the rows to kMicroCols columns of S^T: 32x the work for
// one row.
constexpr int kDirectRows = 4;

template <typename T>
void forward_rows_direct(const Flash_params& p, int b, int h, int r0, int rows, const Flash_seq& seq, float* buf) {
  const int d = p.head_dim;
  const flash::Mask mask = seq.mask(p);
  const int kvh = p.kv_head(h);
  const T* k = static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, 0, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const T* v = static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, 0, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  float* const q = buf;                      // d
  float* const o = q + round_up(d, 16);      // d
  float* const s = o + round_up(d, 16);      // the row's scores, padded to 16
  for (int i = 0; i < rows; ++i) {
    const int row = r0 + i;
    int jb, je;
    mask.key_range(row, row + 1, &jb, &je);
    T* dst = static_cast<T*>(p.out) + seq.q_offset(p, b, h, row, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
    float* lse = p.lse + seq.lse_index(p, b, h, row);
    if (jb >= je) {  // sees no key: output 0, lse +inf (flash_math.h's OnlineSoftmax of an empty row)
      for (int c = 0; c < d; ++c) dst[c] = from_float<T>(0.f);
      *lse = flash::OnlineSoftmax{}.lse();
      continue;
    }
    const T* qs = static_cast<const T*>(p.q) + seq.q_offset(p, b, h, row, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
    for (int c = 0; c < d; ++c) q[c] = to_float(qs[c]);
    const int n = je - jb, n16 = round_up(n, 16);
    float row_max = -flash::kInf;
    for (int j = 0; j < n; ++j) {
      const T* kj = k + int64_t(jb + j) * p.k_row_stride;
      float dot = 0.f;
      #pragma omp simd reduction(+ : dot)
      for (int c = 0; c < d; ++c) dot += q[c] * to_float(kj[c]);
      s[j] = flash::apply_softcap(dot * p.scale, p.softcap) * flash::kLog2e;
      row_max = std::max(row_max, s[j]);
    }
    std::fill(s + n, s + n16, -flash::kInf);
    Vec16 sums{};
    for (int j = 0; j < n16; j += 16) {
      const Vec16 x = load16(s + j);
      const Vec16 prob = x == -flash::kInf ? Vec16{} : exp2_nonpositive(x - row_max);
      sums += prob;
      store16(s + j, prob);
    }
    float sum = 0.f;
    for (int l = 0; l < 16; ++l) sum += sums[l];
    std::fill(o, o + d, 0.f);
    const uint32_t hash = p.dropout.row_hash(uint32_t(b * p.heads + h), uint32_t(row));
    for (int j = 0; j < n; ++j) {
      float pj = s[j];
      if (p.dropout.enabled()) pj = p.dropout.keep(hash, uint32_t(jb + j)) ? pj * p.dropout.scale : 0.f;
      const T* vj = v + int64_t(jb + j) * p.v_row_stride;
      #pragma omp simd
      for (int c = 0; c < d; ++c) o[c] += pj * to_float(vj[c]);
    }
    const flash::OnlineSoftmax stats{row_max, sum};
    const float inv = stats.inv_sum();
    for (int c = 0; c < d; ++c) dst[c] = from_float<T>(o[c] * inv);
    *lse = stats.lse();
  }
}

template <typename T>
void forward_typed(const Flash_params& p) {
  const int d = p.head_dim, dp = round_up(d, kMicroCols);
  const int m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  constexpr int M = kBlockM, N = kBlockN;
  const double macs = 2.0 * p.batch * p.heads * double(p.seqlen_q) * p.seqlen_k * dp;
  const size_t scratch_floats = size_t(4 * M * dp + 2 * N * dp + N * M + 5 * M) + 2 * dp + round_up(p.seqlen_k, 16);
  Region_errors errors;
  #pragma omp parallel if (macs > kParallelMacs)
  {
    #pragma omp for collapse(3) schedule(dynamic)
    for (int b = 0; b < p.batch; ++b) {
      for (int h = 0; h < p.heads; ++h) {
        for (int mb = 0; mb < m_blocks; ++mb) {
          errors.run([&] {
            float* const qf = scratch(scratch_floats);  // this thread's, allocated once
            float* const qt = qf + M * dp;
            float* const of = qt + M * dp;
            float* const kf = of + M * dp;
            float* const vf = kf + N * dp;
            float* const st = vf + N * dp;
            float* const row_max = st + N * M;
            float* const row_sum = row_max + M;
            float* const factor = row_sum + M;
            float* const tile_max = factor + M;
            uint32_t* const hashes = reinterpret_cast<uint32_t*>(tile_max + M);
            float* const direct_buf = tile_max + 2 * M;
            const Flash_seq seq = Flash_seq::of(p, b);
            const int r0 = mb * M;
            if (r0 >= seq.seqlen_q) return;
            const int rows = std::min(M, seq.seqlen_q - r0);
            if (rows <= kDirectRows) {
              forward_rows_direct<T>(p, b, h, r0, rows, seq, direct_buf);
              return;
            }
            const int cols = round_up(rows, kMicroCols);  // query columns of S^T actually computed
            const flash::Mask mask = seq.mask(p);
            int c_begin, c_end;
            mask.key_range(r0, r0 + rows, &c_begin, &c_end);
            const int kvh = p.kv_head(h);
            load_tile(static_cast<const T*>(p.q) + seq.q_offset(p, b, h, r0, p.q_batch_stride, p.q_row_stride, p.q_head_stride),
                      p.q_row_stride, rows, d, qf, dp, cols);
            transpose(qf, cols, dp, qt);  // qt[c * cols + i]: pitch `cols`
            std::fill(of, of + cols * dp, 0.f);
            std::fill(row_max, row_max + cols, -flash::kInf);
            std::fill(row_sum, row_sum + cols, 0.f);
            for (int i = 0; i < cols; ++i) hashes[i] = p.dropout.row_hash(uint32_t(b * p.heads + h), uint32_t(r0 + i));
            for (int c0 = c_begin; c0 < c_end; c0 += N) {
              const int n = std::min(N, c_end - c0);
              load_tile(static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, c0, p.k_batch_stride, p.k_row_stride, p.k_head_stride),
                        p.k_row_stride, n, d, kf, dp, N);
              const bool v_finite = load_tile<T, true>(
                  static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, c0, p.v_batch_stride, p.v_row_stride, p.v_head_stride),
                  p.v_row_stride, n, d, vf, dp, N);
              tile_gemm<false>(kf, dp, 1, qt, cols, st, cols, N, cols, dp);  // S^T = K Q^T, pitch `cols`
              // Scaled, capped, masked scores (log2 units) and each query's max over this tile.
              std::fill(tile_max, tile_max + cols, -flash::kInf);
              for (int j = 0; j < N; ++j) {
                float* sj = st + j * cols;
                int ib = 0, ie = 0;
                if (j < n) seeing_rows(mask, c0 + j, r0, rows, &ib, &ie);
                if (p.softcap > 0) {
                  for (int i = ib; i < ie; ++i) sj[i] = flash::apply_softcap(sj[i] * p.scale, p.softcap);
                } else {
                  #pragma omp simd
                  for (int i = ib; i < ie; ++i) sj[i] *= p.scale;
                }
                #pragma omp simd
                for (int i = 0; i < cols; ++i) {
                  sj[i] = (i >= ib && i < ie) ? sj[i] * flash::kLog2e : -flash::kInf;
                  tile_max[i] = std::max(tile_max[i], sj[i]);
                }
              }
              // The online-softmax update of flash_math.h's OnlineSoftmax, as vectors over queries.
              for (int i = 0; i < cols; i += 16) {
                const Vec16 old_max = load16(row_max + i), tmax = load16(tile_max + i);
                const Vec16 new_max = old_max > tmax ? old_max : tmax;
                const Vec16 f = new_max == -flash::kInf ? 1.f + Vec16{} : exp2_nonpositive(old_max - new_max);
                store16(factor + i, f);
                store16(row_max + i, new_max);
                store16(row_sum + i, load16(row_sum + i) * f);
              }
              for (int j = 0; j < N; ++j) {
                float* sj = st + j * cols;
                for (int i = 0; i < cols; i += 16) {
                  const Vec16 x = load16(sj + i);
                  const Vec16 prob = x == -flash::kInf ? Vec16{} : exp2_nonpositive(x - load16(row_max + i));
                  store16(row_sum + i, load16(row_sum + i) + prob);
                  store16(sj + i, prob);
                }
                if (p.dropout.enabled()) {  // the sums above are of the undropped probabilities
                  for (int i = 0; i < cols; ++i)
                    sj[i] = p.dropout.keep(hashes[i], uint32_t(c0 + j)) ? sj[i] * p.dropout.scale : 0.f;
                }
              }
              for (int i = 0; i < cols; ++i) {
                float* o = of + i * dp;
                #pragma omp simd
                for (int c = 0; c < dp; ++c) o[c] *= factor[i];
              }
              if (v_finite) {
                tile_gemm<true>(st, 1, cols, vf, dp, of, dp, cols, dp, N);  // O += P V
              } else {
                // A NaN / inf in V: masked keys have P = 0, but 0 * NaN is NaN, so the product
                // would carry it to rows that cannot see the key. Sum each row's visible keys only.
                for (int j = 0; j < n; ++j) {
                  int ib, ie;
                  seeing_rows(mask, c0 + j, r0, rows, &ib, &ie);
                  const float* vj = vf + j * dp;
                  for (int i = ib; i < ie; ++i) {
                    const float w = st[j * cols + i];
                    float* o = of + i * dp;
                    #pragma omp simd
                    for (int c = 0; c < dp; ++c) o[c] += w * vj[c];
                  }
                }
              }
            }
            T* out = static_cast<T*>(p.out);
            for (int i = 0; i < rows; ++i) {
              flash::OnlineSoftmax row{row_max[i] == -flash::kInf ? -flash::kInf : row_max[i], row_sum[i]};
              const float inv = row.inv_sum();
              T* dst = out + seq.q_offset(p, b, h, r0 + i, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
              for (int c = 0; c < d; ++c) dst[c] = from_float<T>(of[i * dp + c] * inv);
              p.lse[seq.lse_index(p, b, h, r0 + i)] = row.lse();
            }
          });
        }
      }
    }
  }
  errors.rethrow();
}

template <typename T>
void backward_typed(const Flash_params& p) {
  const int d = p.head_dim, dp = round_up(d, kMicroCols);
  const int group = p.heads / p.kv_heads;
  constexpr int M = kBlockM, N = kBlockN;
  const double macs = 5.0 * p.batch * p.heads * double(p.seqlen_q) * p.seqlen_k * dp;
  Region_errors errors;
  #pragma omp parallel if (macs > kParallelMacs)
  {
    const int max_q = round_up(std::max(p.seqlen_q, 1), M), max_k = round_up(std::max(p.seqlen_k, 1), N);
    std::vector<float> qf, qt, dof, dot, dqf, d_rows, lse, row, dkf, dvf, kf, vf, st, dpt, pt;
    std::vector<uint32_t> hashes;
    // Every thread reaches the worksharing loop below, even when its buffers failed.
    const bool allocated = errors.run([&] {
      for (auto* v : {&qf, &qt, &dof, &dot, &dqf}) v->resize(size_t(max_q) * dp);
      for (auto* v : {&d_rows, &lse}) v->resize(max_q);
      row.resize(d);
      for (auto* v : {&dkf, &dvf}) v->resize(size_t(max_k) * dp);
      for (auto* v : {&kf, &vf}) v->resize(N * dp);
      for (auto* v : {&st, &dpt, &pt}) v->resize(N * M);
      hashes.resize(max_q);
    });
    #pragma omp for collapse(2) schedule(dynamic)
    for (int b = 0; b < p.batch; ++b) {
      for (int kvh = 0; kvh < p.kv_heads; ++kvh) {
        if (!allocated) continue;
        errors.run([&] {
          const Flash_seq seq = Flash_seq::of(p, b);
          const int sq = seq.seqlen_q, sk = seq.seqlen_k;
          const int sq_p = round_up(std::max(sq, 1), M), sk_p = round_up(std::max(sk, 1), N);
          const flash::Mask mask = seq.mask(p);
          std::fill(dkf.begin(), dkf.begin() + size_t(sk_p) * dp, 0.f);
          std::fill(dvf.begin(), dvf.begin() + size_t(sk_p) * dp, 0.f);
          for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
            const T* q = static_cast<const T*>(p.q) + seq.q_offset(p, b, h, 0, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
            const T* dout = static_cast<const T*>(p.dout) +
                            seq.q_offset(p, b, h, 0, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
            const T* out = static_cast<const T*>(p.out) +
                           seq.q_offset(p, b, h, 0, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
            load_tile(q, p.q_row_stride, sq, d, qf.data(), dp, sq_p);
            load_tile(dout, p.dout_row_stride, sq, d, dof.data(), dp, sq_p);
            transpose(qf.data(), sq_p, dp, qt.data());
            transpose(dof.data(), sq_p, dp, dot.data());
            for (int i = 0; i < sq_p; ++i) {  // D_i = rowsum(dO * O), the softmax backward's correction
              float acc = 0.f;
              if (i < sq) {
                for (int c = 0; c < d; ++c) row[c] = to_float(out[i * p.out_row_stride + c]);
                for (int c = 0; c < d; ++c) acc += row[c] * dof[i * dp + c];
              }
              d_rows[i] = acc;
              lse[i] = i < sq ? p.lse[seq.lse_index(p, b, h, i)] : flash::kInf;
              hashes[i] = p.dropout.row_hash(uint32_t(b * p.heads + h), uint32_t(i));
            }
            std::fill(dqf.begin(), dqf.begin() + size_t(sq_p) * dp, 0.f);
            for (int c0 = 0; c0 < sk; c0 += N) {
              const int n = std::min(N, sk - c0);
              int r_begin, r_end;
              mask.row_range(c0, c0 + n, &r_begin, &r_end);
              if (r_begin >= r_end) continue;
              load_tile(static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, c0, p.k_batch_stride, p.k_row_stride, p.k_head_stride),
                        p.k_row_stride, n, d, kf.data(), dp, N);
              load_tile(static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, c0, p.v_batch_stride, p.v_row_stride, p.v_head_stride),
                        p.v_row_stride, n, d, vf.data(), dp, N);
              float* dk = &dkf[size_t(c0) * dp];
              float* dv = &dvf[size_t(c0) * dp];
              for (int m0 = r_begin / M * M; m0 < r_end; m0 += M) {
                tile_gemm<false>(kf.data(), dp, 1, &qt[m0], sq_p, st.data(), M, N, M, dp);    // S^T = K Q^T
                tile_gemm<false>(vf.data(), dp, 1, &dot[m0], sq_p, dpt.data(), M, N, M, dp);  // dP^T = V dO^T
                for (int j = 0; j < N; ++j) {  // st becomes dS^T (scaled), pt P^T (dropped)
                  float* sj = &st[j * M];
                  float* pj = &pt[j * M];
                  const float* dpj = &dpt[j * M];
                  int ib = 0, ie = 0;
                  if (j < n) seeing_rows(mask, c0 + j, m0, std::min(M, sq - m0), &ib, &ie);
                  if (p.softcap == 0.f && !p.dropout.enabled()) {  // the common case, 16 queries at a time
                    const IVec16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
                    for (int i = 0; i < M; i += 16) {
                      const Vec16 l = load16(&lse[m0 + i]), s_ = load16(sj + i) * p.scale;
                      const IVec16 idx = lane + i;
                      const auto on = (idx >= ib) & (idx < ie) & (l != flash::kInf);
                      const Vec16 prob = on ? exp2_nonpositive((s_ - l) * flash::kLog2e) : Vec16{};
                      store16(pj + i, prob);
                      store16(sj + i, prob * (load16(dpj + i) - load16(&d_rows[m0 + i])) * p.scale);
                    }
                    continue;
                  }
                  for (int i = 0; i < M; ++i) {
                    const float capped = flash::apply_softcap(sj[i] * p.scale, p.softcap);
                    const float l = lse[m0 + i];
                    const bool on = i >= ib && i < ie && l != flash::kInf;
                    const float prob = on ? exp2_nonpositive((capped - l) * flash::kLog2e) : 0.f;
                    float kept = prob, dprob = dpj[i];
                    if (p.dropout.enabled()) {
                      const bool keep = p.dropout.keep(hashes[m0 + i], uint32_t(c0 + j));
                      kept = keep ? prob * p.dropout.scale : 0.f;
                      dprob = keep ? dprob * p.dropout.scale : 0.f;
                    }
                    pj[i] = kept;
                    sj[i] = flash::softmax_grad(prob, dprob, d_rows[m0 + i]) * flash::softcap_grad(capped, p.softcap) *
                            p.scale;
                  }
                }
                tile_gemm<true>(pt.data(), M, 1, &dof[size_t(m0) * dp], dp, dv, dp, N, dp, M);  // dV += P^T dO
                tile_gemm<true>(st.data(), M, 1, &qf[size_t(m0) * dp], dp, dk, dp, N, dp, M);   // dK += dS^T Q
                tile_gemm<true>(st.data(), 1, M, kf.data(), dp, &dqf[size_t(m0) * dp], dp, M, dp, N);  // dQ += dS K
              }
            }
            T* dq = static_cast<T*>(p.dq) + seq.q_offset(p, b, h, 0, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
            for (int i = 0; i < sq; ++i) {
              for (int c = 0; c < d; ++c) dq[i * p.dq_row_stride + c] = from_float<T>(dqf[i * dp + c]);
            }
          }
          T* dk = static_cast<T*>(p.dk) + seq.k_offset(p, b, kvh, 0, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
          T* dv = static_cast<T*>(p.dv) + seq.k_offset(p, b, kvh, 0, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
          for (int j = 0; j < sk; ++j) {
            for (int c = 0; c < d; ++c) {
              dk[j * p.dk_row_stride + c] = from_float<T>(dkf[j * dp + c]);
              dv[j * p.dv_row_stride + c] = from_float<T>(dvf[j * dp + c]);
            }
          }
        });
      }
    }
  }
  errors.rethrow();
}

template <template <typename> class Fn>
void dispatch(const Flash_params& p) {
  switch (p.dtype) {
    case DType::kFloat32: Fn<float>::run(p); break;
    case DType::kFloat16: Fn<Half>::run(p); break;
    case DType::kBFloat16: Fn<BFloat16>::run(p); break;
  }
}

template <typename T> struct Forward { static void run(const Flash_params& p) { forward_typed<T>(p); } };
template <typename T> struct Backward { static void run(const Flash_params& p) { backward_typed<T>(p); } };

}  // namespace

void flash_fwd_cpu(const Flash_params& params) { dispatch<Forward>(params); }
void flash_bwd_cpu(const Flash_params& params) { dispatch<Backward>(params); }

}  // namespace phi
