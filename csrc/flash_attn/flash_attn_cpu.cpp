// Flash attention, CPU kernels: the flash-attention 2 algorithm with fp32 tiles in L1/L2
// instead of shared memory, and the same masking / online-softmax / LSE / dropout rules as
// the CUDA kernels (flash_math.h). No torch headers here; the glue is flash_attn_ops.cpp.
//
// Every matrix product (S = Q K^T, O += P V, and the backward's dP = dO V^T, dV += P^T dO,
// dK += dS^T Q, dQ += dS K) goes through one register-blocked micro-kernel (tile_gemm): an
// 8 x 32 fp32 accumulator block, 16 AVX-512 registers, so each loaded B vector feeds 8 FMAs.
// Tiles are zero-padded (rows to a multiple of 8, head_dim to a multiple of 32), and masked or
// padded scores get probability 0, so padding never reaches an output.
//
// Forward: OpenMP over (batch, head, block of kBlockM query rows); the task streams the
// visible key blocks once with a running max and sum per row (memory O(seqlen)).
// Backward: OpenMP over (batch, kv head): a task owns its dk/dv rows (the GQA heads of a
// group accumulate into them in turn) and its heads' dq rows, so no atomics: deterministic.
#include <algorithm>
#include <bit>
#include <cstring>
#include <vector>

#include "common/cpu_types.h"
#include "flash_attn/flash.h"
#include "flash_attn/flash_launch.h"

namespace phi {
namespace {

constexpr int kBlockM = 64;  // query rows per tile
constexpr int kBlockN = 64;  // keys per tile
constexpr int kMicroRows = 8;
constexpr int kMicroCols = 32;

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// C[r][c] (+)= sum_k A[r * lda + k] * B[k * ldb + c] for r < rows, c < cols, k < depth.
// rows is a multiple of kMicroRows and cols of kMicroCols (tiles are padded). The
// accumulator block is written with GCC vector types so that it stays in registers whatever
// the target ISA (two 16-wide vectors per row: 16 zmm registers on AVX-512).
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));

template <bool kAccumulate>
void tile_gemm(const float* __restrict__ a, int lda, const float* __restrict__ b, int ldb, float* __restrict__ c,
               int ldc, int rows, int cols, int depth) {
  static_assert(kMicroCols == 32, "two Vec16 per accumulator row");
  for (int r0 = 0; r0 < rows; r0 += kMicroRows) {
    for (int c0 = 0; c0 < cols; c0 += kMicroCols) {
      Vec16 acc[kMicroRows][2];
      for (int r = 0; r < kMicroRows; ++r) {
        for (int v = 0; v < 2; ++v) {
          if (kAccumulate) {
            std::memcpy(&acc[r][v], c + (r0 + r) * ldc + c0 + 16 * v, sizeof(Vec16));
          } else {
            acc[r][v] = Vec16{};
          }
        }
      }
      for (int k = 0; k < depth; ++k) {
        Vec16 b0, b1;
        std::memcpy(&b0, b + k * ldb + c0, sizeof(Vec16));
        std::memcpy(&b1, b + k * ldb + c0 + 16, sizeof(Vec16));
        for (int r = 0; r < kMicroRows; ++r) {
          const float ar = a[(r0 + r) * lda + k];
          acc[r][0] += ar * b0;
          acc[r][1] += ar * b1;
        }
      }
      for (int r = 0; r < kMicroRows; ++r) {
        for (int v = 0; v < 2; ++v) std::memcpy(c + (r0 + r) * ldc + c0 + 16 * v, &acc[r][v], sizeof(Vec16));
      }
    }
  }
}

// 2^x for x <= 0 (scores relative to the row max), branch-free so loops over it vectorize
// (libm's exp2f does not). Cephes' exp2f polynomial on [-0.5, 0.5], relative error ~1e-7;
// x below -126 (including -inf) gives 2^-126 * 2^f ~ 1e-38, which the callers mask to 0.
inline float exp2_nonpositive(float x) {
  x = std::min(std::max(x, -126.f), 0.f);  // also keeps the int conversion below in range
  const float i = std::floor(x + 0.5f);
  const float f = x - i;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  return p * std::bit_cast<float>(uint32_t(int32_t(i) + 127) << 23);
}

// Copies `rows` rows of `d` elements (row stride `stride`) into a zero-padded fp32 tile with
// row pitch `pitch`; rows up to `padded_rows` are zero.
template <typename T>
void load_tile(const T* src, int64_t stride, int rows, int d, float* dst, int pitch, int padded_rows) {
  for (int r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int c = 0; c < d; ++c) dst[r * pitch + c] = to_float(s[c]);
    std::fill(dst + r * pitch + d, dst + (r + 1) * pitch, 0.f);
  }
  std::fill(dst + rows * pitch, dst + padded_rows * pitch, 0.f);
}

// dst[c * pitch + r] = src[r][c]: a key or value block transposed (pitch = kBlockN), zero
// outside the valid rows and columns.
void transpose_tile(const float* src, int src_pitch, int rows, int cols_padded, float* dst) {
  std::fill(dst, dst + cols_padded * kBlockN, 0.f);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols_padded; ++c) dst[c * kBlockN + r] = src[r * src_pitch + c];
  }
}

// The visible key columns of query row `row`, relative to the key block starting at c0 with n keys.
inline void visible_cols(const flash::Mask& mask, int row, int c0, int n, int* begin, int* end) {
  mask.key_range(row, row + 1, begin, end);
  *begin = std::max(*begin - c0, 0);
  *end = std::min(*end - c0, n);
}

template <typename T>
void forward_typed(const Flash_params& p) {
  const int d = p.head_dim, dp = round_up(d, kMicroCols);
  const int m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  #pragma omp parallel
  {
    std::vector<float> qf(kBlockM * dp), of(kBlockM * dp), kf(kBlockN * dp), kt(dp * kBlockN), vf(kBlockN * dp);
    std::vector<float> s(kBlockM * kBlockN);
    std::vector<flash::OnlineSoftmax> state(kBlockM);
    #pragma omp for collapse(3) schedule(dynamic)
    for (int b = 0; b < p.batch; ++b) {
      for (int h = 0; h < p.heads; ++h) {
        for (int mb = 0; mb < m_blocks; ++mb) {
          const Flash_seq seq = Flash_seq::of(p, b);
          const int r0 = mb * kBlockM;
          if (r0 >= seq.seqlen_q) continue;
          const int rows = std::min(kBlockM, seq.seqlen_q - r0), rows_p = round_up(rows, kMicroRows);
          const flash::Mask mask = seq.mask(p);
          int c_begin, c_end;
          mask.key_range(r0, r0 + rows, &c_begin, &c_end);
          const int kvh = p.kv_head(h);
          load_tile(static_cast<const T*>(p.q) + seq.q_offset(p, b, h, r0, p.q_batch_stride, p.q_row_stride, p.q_head_stride),
                    p.q_row_stride, rows, d, qf.data(), dp, rows_p);
          std::fill(of.begin(), of.end(), 0.f);
          std::fill(state.begin(), state.end(), flash::OnlineSoftmax{});
          for (int c0 = c_begin; c0 < c_end; c0 += kBlockN) {
            const int n = std::min(kBlockN, c_end - c0);
            load_tile(static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, c0, p.k_batch_stride, p.k_row_stride, p.k_head_stride),
                      p.k_row_stride, n, d, kf.data(), dp, kBlockN);
            transpose_tile(kf.data(), dp, n, dp, kt.data());
            load_tile(static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, c0, p.v_batch_stride, p.v_row_stride, p.v_head_stride),
                      p.v_row_stride, n, d, vf.data(), dp, kBlockN);
            tile_gemm<false>(qf.data(), dp, kt.data(), kBlockN, s.data(), kBlockN, rows_p, kBlockN, dp);
            for (int i = 0; i < rows; ++i) {
              const int row = r0 + i;
              float* si = &s[i * kBlockN];
              int jb, je;
              visible_cols(mask, row, c0, n, &jb, &je);
              if (jb >= je) {
                std::fill(si, si + kBlockN, 0.f);
                continue;
              }
              float tile_max = -flash::kInf;
              for (int j = jb; j < je; ++j) {
                si[j] = flash::apply_softcap(si[j] * p.scale, p.softcap) * flash::kLog2e;
                tile_max = std::max(tile_max, si[j]);
              }
              flash::OnlineSoftmax& st = state[i];
              const float factor = st.rescale(tile_max);
              float* o = &of[i * dp];
              #pragma omp simd
              for (int c = 0; c < dp; ++c) o[c] *= factor;
              float sum = 0.f;
              #pragma omp simd reduction(+ : sum)
              for (int j = 0; j < kBlockN; ++j) {
                const float pj = (j >= jb && j < je) ? exp2_nonpositive(si[j] - st.max) : 0.f;
                si[j] = pj;
                sum += pj;
              }
              st.sum += sum;
              if (p.dropout.enabled()) {  // the sum above is of the undropped probabilities
                const uint32_t hash = p.dropout.row_hash(uint32_t(b * p.heads + h), uint32_t(row));
                for (int j = jb; j < je; ++j) si[j] = p.dropout.keep(hash, uint32_t(c0 + j)) ? si[j] * p.dropout.scale : 0.f;
              }
            }
            for (int i = rows; i < rows_p; ++i) std::fill(&s[i * kBlockN], &s[(i + 1) * kBlockN], 0.f);
            tile_gemm<true>(s.data(), kBlockN, vf.data(), dp, of.data(), dp, rows_p, dp, kBlockN);
          }
          T* out = static_cast<T*>(p.out);
          for (int i = 0; i < rows; ++i) {
            const float inv = state[i].inv_sum();
            T* dst = out + seq.q_offset(p, b, h, r0 + i, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
            for (int c = 0; c < d; ++c) dst[c] = from_float<T>(of[i * dp + c] * inv);
            p.lse[seq.lse_index(p, b, h, r0 + i)] = state[i].lse();
          }
        }
      }
    }
  }
}

template <typename T>
void backward_typed(const Flash_params& p) {
  const int d = p.head_dim, dp = round_up(d, kMicroCols);
  const int group = p.heads / p.kv_heads;
  #pragma omp parallel
  {
    const size_t max_q = size_t(round_up(std::max(p.seqlen_q, 1), kBlockM)), max_k = size_t(round_up(std::max(p.seqlen_k, 1), kBlockN));
    std::vector<float> qf(max_q * dp), dof(max_q * dp), dqf(max_q * dp), d_rows(max_q), lse(max_q), row(d);
    std::vector<float> dkf(max_k * dp), dvf(max_k * dp);
    std::vector<float> kf(kBlockN * dp), kt(dp * kBlockN), vf(kBlockN * dp), vt(dp * kBlockN);
    std::vector<float> s(kBlockM * kBlockN), dpm(kBlockM * kBlockN), pt(kBlockN * kBlockM), dst(kBlockN * kBlockM);
    #pragma omp for collapse(2) schedule(dynamic)
    for (int b = 0; b < p.batch; ++b) {
      for (int kvh = 0; kvh < p.kv_heads; ++kvh) {
        const Flash_seq seq = Flash_seq::of(p, b);
        const int sq = seq.seqlen_q, sk = seq.seqlen_k;
        const int sq_p = round_up(sq, kBlockM), sk_p = round_up(sk, kBlockN);
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
          for (int i = 0; i < sq; ++i) {  // D_i = rowsum(dO * O), the softmax backward's correction
            for (int c = 0; c < d; ++c) row[c] = to_float(out[i * p.out_row_stride + c]);
            float acc = 0.f;
            for (int c = 0; c < d; ++c) acc += row[c] * dof[i * dp + c];
            d_rows[i] = acc;
            lse[i] = p.lse[seq.lse_index(p, b, h, i)];
          }
          std::fill(dqf.begin(), dqf.begin() + size_t(sq_p) * dp, 0.f);
          for (int c0 = 0; c0 < sk; c0 += kBlockN) {
            const int n = std::min(kBlockN, sk - c0);
            int r_begin, r_end;
            mask.row_range(c0, c0 + n, &r_begin, &r_end);
            if (r_begin >= r_end) continue;
            load_tile(static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, c0, p.k_batch_stride, p.k_row_stride, p.k_head_stride),
                      p.k_row_stride, n, d, kf.data(), dp, kBlockN);
            transpose_tile(kf.data(), dp, n, dp, kt.data());
            load_tile(static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, c0, p.v_batch_stride, p.v_row_stride, p.v_head_stride),
                      p.v_row_stride, n, d, vf.data(), dp, kBlockN);
            transpose_tile(vf.data(), dp, n, dp, vt.data());
            float* dk = &dkf[size_t(c0) * dp];
            float* dv = &dvf[size_t(c0) * dp];
            for (int m0 = r_begin / kBlockM * kBlockM; m0 < r_end; m0 += kBlockM) {
              const int rows = std::min(kBlockM, sq - m0);
              tile_gemm<false>(&qf[m0 * dp], dp, kt.data(), kBlockN, s.data(), kBlockN, kBlockM, kBlockN, dp);
              tile_gemm<false>(&dof[m0 * dp], dp, vt.data(), kBlockN, dpm.data(), kBlockN, kBlockM, kBlockN, dp);
              std::fill(pt.begin(), pt.end(), 0.f);
              std::fill(dst.begin(), dst.end(), 0.f);
              for (int i = 0; i < rows; ++i) {
                const int row_i = m0 + i;
                float* si = &s[i * kBlockN];   // becomes dS (scaled) in place
                const float* dpi = &dpm[i * kBlockN];
                int jb, je;
                visible_cols(mask, row_i, c0, n, &jb, &je);
                if (jb >= je || lse[row_i] == flash::kInf) {
                  std::fill(si, si + kBlockN, 0.f);
                  continue;
                }
                const uint32_t hash = p.dropout.row_hash(uint32_t(b * p.heads + h), uint32_t(row_i));
                for (int j = 0; j < kBlockN; ++j) {
                  if (j < jb || j >= je) {
                    si[j] = 0.f;
                    continue;
                  }
                  const float capped = flash::apply_softcap(si[j] * p.scale, p.softcap);
                  const float prob = exp2_nonpositive((capped - lse[row_i]) * flash::kLog2e);
                  float kept = prob, dprob = dpi[j];
                  if (p.dropout.enabled()) {
                    const bool keep = p.dropout.keep(hash, uint32_t(c0 + j));
                    kept = keep ? prob * p.dropout.scale : 0.f;
                    dprob = keep ? dprob * p.dropout.scale : 0.f;
                  }
                  const float ds = flash::softmax_grad(prob, dprob, d_rows[row_i]) *
                                   flash::softcap_grad(capped, p.softcap) * p.scale;
                  si[j] = ds;
                  pt[j * kBlockM + i] = kept;
                  dst[j * kBlockM + i] = ds;
                }
              }
              for (int i = rows; i < kBlockM; ++i) std::fill(&s[i * kBlockN], &s[(i + 1) * kBlockN], 0.f);
              tile_gemm<true>(pt.data(), kBlockM, &dof[m0 * dp], dp, dv, dp, kBlockN, dp, kBlockM);
              tile_gemm<true>(dst.data(), kBlockM, &qf[m0 * dp], dp, dk, dp, kBlockN, dp, kBlockM);
              tile_gemm<true>(s.data(), kBlockN, kf.data(), dp, &dqf[m0 * dp], dp, kBlockM, dp, kBlockN);
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
      }
    }
  }
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
