// Flash attention, CPU kernels: the flash-attention 2 algorithm with fp32 tiles in L1/L2
// instead of shared memory, and the same masking / online-softmax / LSE / dropout rules as
// the CUDA kernels (flash_math.h). No torch headers here; the glue is flash_attn_ops.cpp.
// Compiled once per CPU capability (csrc/cpu_isa); the primitives are flash_cpu_tiles.h.
//
// Scores are kept transposed, S^T = K Q^T (keys x queries): then every product (S^T, O += P V,
// and the backward's dP^T = V dO^T, dV += P^T dO, dK += dS^T Q, dQ += dS K) reads its B operand
// as contiguous rows of an untransposed tile, the softmax statistics of the queries are
// vectors along a row of S^T, and only Q and dO get transposed, once per head. One
// register-blocked tile product (tile_gemm) does every product. Tiles are zero-padded (head_dim
// to a multiple of 32, query columns of S^T to a multiple of 32), and masked or padded scores
// get probability 0, so padding never reaches an output.
//
// Forward: OpenMP over (batch, head, block of kBlockM query rows); the task streams the
// visible key tiles once, in four steps per tile (tile_scores, rescale_running, tile_probs,
// accumulate_output), then finalize_rows; memory O(seqlen). A block of at most kDirectRows
// rows (a decoding step) takes attend_rows or decode_rows instead (flash_decode_cpu.h): exact
// two-pass softmax, K and V read in place.
// Backward: OpenMP over (batch, kv head): a task owns its dk/dv rows (the GQA heads of a
// group accumulate into them in turn) and its heads' dq rows, so no atomics: deterministic.
// Per (key tile, query tile): S^T and dP^T, score_grads (P^T and dS^T), accumulate_grads.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include <omp.h>

#include "common/cpu_types.h"
#include "flash_attn/flash.h"
#include "flash_attn/flash_cpu_tiles.h"
#include "flash_attn/flash_launch.h"

namespace phi {
namespace {

constexpr int kBlockM = 64;     // queries per tile
constexpr int kBlockN = 64;     // keys per tile
constexpr int kMicroCols = 32;  // head_dim and the query columns of S^T are padded to this
constexpr int kDirectRows = 4;  // blocks of at most this many query rows take attend_rows
constexpr int kPackKeys = 1024; // from this many keys the forward packs a head's K and V once
static_assert(kMicroCols % kGemmCols == 0 && kBlockM % kGemmCols == 0, "tile widths are whole register blocks");

int round_up(int x, int m) { return (x + m - 1) / m * m; }

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

// Hands out consecutive arrays of one fp32 buffer (each rounded to 64 bytes). On a null base it
// only counts: a scratch struct's constructor run on Carver(nullptr) sizes the buffer that the
// same constructor then carves, so size and layout cannot drift apart.
class Carver {
 public:
  explicit Carver(float* base) : base_(base) {}
  float* take(size_t floats) {
    float* p = base_ ? base_ + used_ : nullptr;
    used_ += (floats + 15) / 16 * 16;
    return p;
  }
  uint32_t* take_u32(size_t n) { return reinterpret_cast<uint32_t*>(take(n)); }
  size_t used() const { return used_; }

 private:
  float* base_;
  size_t used_ = 0;
};

// Per-thread scratch that persists across calls (no allocation per call: decoding calls the
// forward with one query row, where a malloc per tile would cost more than the math).
float* thread_scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// The split decoding step's partial records (Key_split), also kept across calls, on the thread
// that calls the kernel (its workers fill them; thread_scratch holds its own task's arrays).
float* split_partials(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// Below this many multiply-adds a call runs on the calling thread: forking OpenMP workers
// costs more than the work (a decoding step of a small model).
constexpr double kParallelMacs = 1 << 20;
// A decoding step costs a few ns per key and head, and threads pay sooner: measured on 2 threads
// (AVX-512, 32 heads of 64), even at 32 keys, 64 keys 21 -> 16 us, 128 keys 46 -> 28 us.
constexpr double kParallelDecodeMacs = 1 << 17;

// The queries (relative to r0, within [0, m)) that see key `col`: [*begin, *end).
inline void seeing_rows(const flash::Mask& mask, int col, int r0, int m, int* begin, int* end) {
  mask.row_range(col, col + 1, begin, end);
  *begin = std::clamp(*begin - r0, 0, m);
  *end = std::clamp(*end - r0, 0, m);
}

// Lanes [i, i + kVecFloats) of a row of S^T, keeping those in [begin, end) and -inf elsewhere.
inline VecN keep_lanes(VecN x, int i, int begin, int end, VecN other) {
  const IVecN idx = lane_index() + i;
  return (idx >= begin) & (idx < end) ? x : other;
}

// Where the mask cuts a pair of tiles (keys [c0, c0 + n), queries [m0, m0 + kBlockM)): for key
// j the queries (relative to m0) that see it, for query i the keys (relative to c0) it sees;
// padding queries (>= seqlen_q) see nothing. A `whole` pair (every key seen by every query, most
// pairs of a long sequence) carries no ranges, and its products run unbanded. A cut pair's
// products are `banded` (tile_gemm skips what the mask hides: about 40% of a causal diagonal
// pair) when `finite`. The forward always bands (a masked score is replaced by -inf whatever
// the product gave); the backward only when its inputs are finite, otherwise its products run
// whole as the reference's do, so that a NaN / inf reaches the same gradients through 0 * NaN
// at masked entries (tests/test_bad_input_kernels.py).
struct Tile_cut {
  bool whole, banded;
  int key_begin[kBlockN], key_end[kBlockN];
  int query_begin[kBlockM], query_end[kBlockM];

  Tile_cut(const flash::Mask& mask, int sq, int c0, int n, int m0, bool finite)
      : whole(mask.tile_all_visible(m0, m0 + kBlockM, c0, c0 + n)), banded(!whole && finite) {
    if (whole) return;
    const int m = std::min(kBlockM, sq - m0);
    for (int j = 0; j < n; ++j) seeing_rows(mask, c0 + j, m0, m, &key_begin[j], &key_end[j]);
    if (!banded) return;
    for (int i = 0; i < kBlockM; ++i) {
      int begin = 0, end = 0;
      if (i < m) mask.key_range(m0 + i, m0 + i + 1, &begin, &end);
      query_begin[i] = std::clamp(begin - c0, 0, n);
      query_end[i] = std::clamp(end - c0, 0, n);
    }
  }
  // Band pointers for tile_gemm: null (no band) unless banded.
  const int* keys_begin() const { return banded ? key_begin : nullptr; }
  const int* keys_end() const { return banded ? key_end : nullptr; }
  const int* queries_begin() const { return banded ? query_begin : nullptr; }
  const int* queries_end() const { return banded ? query_end : nullptr; }
};

// ============================================================================= forward

// A forward task's working set: one block of query rows against key tiles of kBlockN.
struct Fwd_scratch {
  float* q;          // kBlockM x dp: the query rows, zero-padded
  float* q_t;        // dp x cols: Q^T, the B operand of S^T = K Q^T
  float* o;          // kBlockM x dp: the output accumulator
  float* k;          // kBlockN x dp
  float* v;          // kBlockN x dp
  float* s;          // kBlockN x cols: S^T in log2 units, then P^T
  float* row_max;    // kBlockM each: the running max and sum (flash_math.h's OnlineSoftmax; per head in attend_rows),
  float* row_sum;    //   the rescale factor of this tile, this tile's max
  float* factor;
  float* tile_max;
  uint32_t* hashes;  // kBlockM: dropout row hashes
  float* row_q;      // attend_rows, per head: one query row, its output, all its scores
  float* row_o;
  float* row_s;
  float* k_all;      // packed_keys x dp each: a long sequence's K and V, fp32 and contiguous (pack_keys)
  float* v_all;
  int* v_nonfinite;  // packed_keys + 1: rows of V before each row that hold a NaN / inf

  Fwd_scratch(Carver&& c, int dp, int seqlen_k, int row_heads, int packed_keys = 0)
      : q(c.take(kBlockM * dp)), q_t(c.take(kBlockM * dp)), o(c.take(kBlockM * dp)), k(c.take(kBlockN * dp)),
        v(c.take(kBlockN * dp)), s(c.take(kBlockN * kBlockM)), row_max(c.take(std::max(kBlockM, row_heads))),
        row_sum(c.take(std::max(kBlockM, row_heads))),
        factor(c.take(kBlockM)), tile_max(c.take(kBlockM)), hashes(c.take_u32(kBlockM)), row_q(c.take(row_heads * dp)),
        row_o(c.take(row_heads * dp)), row_s(c.take(size_t(row_heads) * round_up(seqlen_k, kVecFloats))),
        k_all(c.take(size_t(packed_keys) * dp)), v_all(c.take(size_t(packed_keys) * dp)),
        v_nonfinite(reinterpret_cast<int*>(c.take(packed_keys + 1))), floats(c.used()) {}
  size_t floats;
};

// The query rows [r0, r0 + rows) of head h of sequence b; `cols` is rows padded to kMicroCols.
struct Query_block {
  int b, h, kvh, r0, rows, cols, d, dp;
  Flash_seq seq;
  flash::Mask mask;
};

template <typename T>
const T* q_row_ptr(const Flash_params& p, const Query_block& qb, int row) {
  return static_cast<const T*>(p.q) + qb.seq.q_offset(p, qb.b, qb.h, row, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
}
template <typename T>
T* out_row_ptr(const Flash_params& p, const Query_block& qb, int row) {
  return static_cast<T*>(p.out) + qb.seq.q_offset(p, qb.b, qb.h, row, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
}
template <typename T>
const T* k_row_ptr(const Flash_params& p, const Query_block& qb, int row) {
  return static_cast<const T*>(p.k) + qb.seq.k_offset(p, qb.b, qb.kvh, row, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
}
template <typename T>
const T* v_row_ptr(const Flash_params& p, const Query_block& qb, int row) {
  return static_cast<const T*>(p.v) + qb.seq.k_offset(p, qb.b, qb.kvh, row, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
}

// Q^T for the block, and the running statistics of an empty row.
template <typename T>
void start_block(const Flash_params& p, const Query_block& qb, const Fwd_scratch& w) {
  load_tile(q_row_ptr<T>(p, qb, qb.r0), p.q_row_stride, qb.rows, qb.d, w.q, qb.dp, qb.cols);
  transpose(w.q, qb.cols, qb.dp, w.q_t);  // q_t[c * cols + i]
  std::fill(w.o, w.o + qb.cols * qb.dp, 0.f);
  std::fill(w.row_max, w.row_max + qb.cols, -flash::kInf);
  std::fill(w.row_sum, w.row_sum + qb.cols, 0.f);
  for (int i = 0; i < qb.cols; ++i) w.hashes[i] = p.dropout.row_hash(uint32_t(qb.b * p.heads + qb.h), uint32_t(qb.r0 + i));
}

// S^T = K Q^T for keys [c0, c0 + n), turned into scaled, capped, masked scores in log2 units
// (-inf where a query cannot see the key, or is padding), and each query's max over the tile.
// In a cut tile, registers of queries that cannot see a key are set to -inf unread (the banded
// product left them unwritten). A whole tile without softcap skips that pass: the product takes
// each query's max as it stores S^T, scaled here (max commutes with the positive scale), and
// S^T stays raw for tile_probs<true> to scale as it reads it. Returns whether S^T is raw.
bool tile_scores(const Flash_params& p, const Query_block& qb, int c0, int n, const float* k, const Tile_cut& cut,
                 const Fwd_scratch& w) {
  const int cols = qb.cols;
  if (cut.whole && p.softcap == 0.f) {
    std::fill(w.tile_max, w.tile_max + cols, -flash::kInf);
    tile_gemm<C_init::kZero>({k, qb.dp, 1, w.q_t, cols, w.s, cols, qb.dp, nullptr, nullptr, nullptr, w.tile_max}, n, cols);
    for (int i = 0; i < cols; i += kVecFloats) store_vec(w.tile_max + i, load_vec(w.tile_max + i) * p.scale * flash::kLog2e);
    return true;
  }
  tile_gemm<C_init::kZero, Band::kColumns>(
      {k, qb.dp, 1, w.q_t, cols, w.s, cols, qb.dp, nullptr, cut.keys_begin(), cut.keys_end()}, n, cols);
  const bool whole = cut.whole;
  const VecN neg_inf = splat(-flash::kInf);
  for (int i = 0; i < cols; i += kVecFloats) {
    VecN tmax = neg_inf;
    for (int j = 0; j < n; ++j) {
      float* sij = w.s + j * cols + i;
      if (!whole && (i + kVecFloats <= cut.key_begin[j] || i >= cut.key_end[j])) {
        store_vec(sij, neg_inf);
        continue;
      }
      VecN x = load_vec(sij);
      if (p.softcap > 0) {
        for (int l = 0; l < kVecFloats; ++l) x[l] = flash::apply_softcap(x[l] * p.scale, p.softcap);
      } else {
        x = x * p.scale;
      }
      x = x * flash::kLog2e;
      if (!whole) x = keep_lanes(x, i, cut.key_begin[j], cut.key_end[j], neg_inf);
      store_vec(sij, x);
      tmax = x > tmax ? x : tmax;  // a NaN score does not move the max (flash_math.h)
    }
    store_vec(w.tile_max + i, tmax);
  }
  return false;
}

// flash_math.h's OnlineSoftmax::rescale, a register of queries at a time: the running max
// moves to include the tile's, the running sum is rescaled, and `factor` keeps the output's.
void rescale_running(const Query_block& qb, const Fwd_scratch& w) {
  for (int i = 0; i < qb.cols; i += kVecFloats) {
    const VecN old_max = load_vec(w.row_max + i), tmax = load_vec(w.tile_max + i);
    const VecN new_max = old_max > tmax ? old_max : tmax;
    const VecN f = new_max == -flash::kInf ? splat(1.f) : exp2_nonpositive(old_max - new_max);
    store_vec(w.factor + i, f);
    store_vec(w.row_max + i, new_max);
    store_vec(w.row_sum + i, load_vec(w.row_sum + i) * f);
  }
}

// P^T = exp2(S^T - max) in place (0 where masked; flash_math.h's OnlineSoftmax::prob) added to
// the running sums, then dropped out: the sums are of the undropped probabilities. kRaw: S^T
// holds raw products (tile_scores' fast path), scaled here as tile_scores would have.
template <bool kRaw>
void tile_probs(const Flash_params& p, const Query_block& qb, int c0, int n, const Fwd_scratch& w) {
  const int cols = qb.cols;
  for (int i = 0; i < cols; i += kVecFloats) {
    const VecN max = load_vec(w.row_max + i);
    VecN sum = load_vec(w.row_sum + i);
    for (int j = 0; j < n; ++j) {
      float* sij = w.s + j * cols + i;
      VecN x = load_vec(sij);
      if constexpr (kRaw) x = x * p.scale * flash::kLog2e;
      const VecN prob = x == -flash::kInf ? VecN{} : exp2_nonpositive(x - max);
      sum += prob;
      store_vec(sij, prob);
    }
    store_vec(w.row_sum + i, sum);
  }
  if (!p.dropout.enabled()) return;
  for (int j = 0; j < n; ++j) {
    float* sj = w.s + j * cols;
    for (int i = 0; i < cols; ++i) sj[i] = p.dropout.keep(w.hashes[i], uint32_t(c0 + j)) ? sj[i] * p.dropout.scale : 0.f;
  }
}

// O = diag(factor) O + P V over the tile's n keys (in a cut tile, each query's visible keys).
void accumulate_output(const Query_block& qb, int c0, int n, const float* v, bool v_finite, const Tile_cut& cut,
                       const Fwd_scratch& w) {
  const int dp = qb.dp;
  if (v_finite) {
    tile_gemm<C_init::kScaleRows, Band::kDepth>(
        {w.s, 1, qb.cols, v, dp, w.o, dp, n, w.factor, cut.queries_begin(), cut.queries_end()}, qb.rows, dp);
    return;
  }
  // A NaN / inf in V: masked keys have P = 0, but 0 * NaN is NaN, so the product would carry
  // it to rows that cannot see the key. Sum each row's visible keys only.
  for (int i = 0; i < qb.rows; ++i) {
    float* o = w.o + i * dp;
    for (int c = 0; c < dp; ++c) o[c] *= w.factor[i];
  }
  for (int j = 0; j < n; ++j) {
    int ib, ie;
    seeing_rows(qb.mask, c0 + j, qb.r0, qb.rows, &ib, &ie);
    const float* vj = v + j * dp;
    for (int i = ib; i < ie; ++i) {
      const float pij = w.s[j * qb.cols + i];
      float* o = w.o + i * dp;
      #pragma omp simd
      for (int c = 0; c < dp; ++c) o[c] += pij * vj[c];
    }
  }
}

// out = O / sum and the LSE, per flash_math.h's OnlineSoftmax.
template <typename T>
void finalize_rows(const Flash_params& p, const Query_block& qb, const Fwd_scratch& w) {
  for (int i = 0; i < qb.rows; ++i) {
    const flash::OnlineSoftmax row{w.row_max[i], w.row_sum[i]};
    const float inv = row.inv_sum();
    T* dst = out_row_ptr<T>(p, qb, qb.r0 + i);
    for (int c = 0; c < qb.d; ++c) dst[c] = from_float<T>(w.o[i * qb.dp + c] * inv);
    p.lse[qb.seq.lse_index(p, qb.b, qb.h, qb.r0 + i)] = row.lse();
  }
}

// K and V of the block's kv head, all seqlen_k rows, into k_all / v_all (zero-padded to dp).
// A long sequence's query blocks then read them contiguously, not as 256 bytes every
// heads * d elements (one page apart for phi-1.5: the prefetchers stop at each, and at s2048
// the tile copies waited on L3).
template <typename T>
void pack_keys(const Flash_params& p, const Query_block& qb, const Fwd_scratch& w) {
  const int sk = qb.seq.seqlen_k;
  load_tile(k_row_ptr<T>(p, qb, 0), p.k_row_stride, sk, qb.d, w.k_all, qb.dp, sk);
  w.v_nonfinite[0] = 0;
  prefetch_first_rows(v_row_ptr<T>(p, qb, 0), p.v_row_stride, sk, qb.d);
  for (int j = 0; j < sk; ++j) {
    prefetch_ahead(v_row_ptr<T>(p, qb, 0), p.v_row_stride, j, sk, qb.d);
    const bool finite = load_tile<T, true>(v_row_ptr<T>(p, qb, j), p.v_row_stride, 1, qb.d, w.v_all + size_t(j) * qb.dp, qb.dp, 1);
    w.v_nonfinite[j + 1] = w.v_nonfinite[j] + (finite ? 0 : 1);
  }
}

// With `packed`, K and V come from pack_keys' copy; otherwise each tile is copied in turn.
template <typename T>
void forward_tiles(const Flash_params& p, const Query_block& qb, const Fwd_scratch& w, bool packed = false) {
  start_block<T>(p, qb, w);
  int c_begin, c_end;
  qb.mask.key_range(qb.r0, qb.r0 + qb.rows, &c_begin, &c_end);
  for (int c0 = c_begin; c0 < c_end; c0 += kBlockN) {
    const int n = std::min(kBlockN, c_end - c0);
    const float* k = w.k;
    const float* v = w.v;
    bool v_finite;
    if (packed) {
      k = w.k_all + size_t(c0) * qb.dp;
      v = w.v_all + size_t(c0) * qb.dp;
      v_finite = w.v_nonfinite[c0 + n] == w.v_nonfinite[c0];
    } else {
      load_tile(k_row_ptr<T>(p, qb, c0), p.k_row_stride, n, qb.d, w.k, qb.dp, n);
      v_finite = load_tile<T, true>(v_row_ptr<T>(p, qb, c0), p.v_row_stride, n, qb.d, w.v, qb.dp, n);
    }
    const Tile_cut cut(qb.mask, qb.seq.seqlen_q, c0, n, qb.r0, true);
    const bool raw = tile_scores(p, qb, c0, n, k, cut, w);
    rescale_running(qb, w);
    raw ? tile_probs<true>(p, qb, c0, n, w) : tile_probs<false>(p, qb, c0, n, w);
    accumulate_output(qb, c0, n, v, v_finite, cut, w);
  }
  finalize_rows<T>(p, qb, w);
}

// A few rows at a time (decoding): attend_rows, decode_rows, decode_task, merge_parts.
#include "flash_attn/flash_decode_cpu.h"

template <typename T>
void forward_typed(const Flash_params& p) {
  const int d = p.head_dim, dp = round_up(d, kMicroCols);
  const double macs = 2.0 * p.batch * p.heads * double(p.seqlen_q) * p.seqlen_k * dp;
  // A decoding step: tasks of decode_heads heads; otherwise tasks of kBlockM query rows of a head.
  const bool decoding = p.seqlen_q <= kDirectRows;
  const bool parallel = macs > (decoding ? kParallelDecodeMacs : kParallelMacs);
  const int threads = parallel ? omp_get_max_threads() : 1;
  // Threads beyond one per sequence split a decoding step's keys (long caches) or else its heads.
  const int spare = decoding ? std::max(1, threads / p.batch) : 1;
  const int key_parts = std::max(1, std::min(spare, p.seqlen_k / kMinPartKeys));
  const int head_chunks = key_parts > 1 ? 1 : std::max(1, std::min(spare, p.heads));  // per sequence
  int decode_heads = (p.heads + head_chunks - 1) / head_chunks;
  if (p.heads % kVecFloats == 0) decode_heads = round_up(decode_heads, kVecFloats);  // whole registers of heads
  const int head_tasks = decoding ? (p.heads + decode_heads - 1) / decode_heads : p.heads;
  // Long sequences with heads enough for every thread: one task per head, K and V packed once
  // for all its query blocks (pack_keys); otherwise one task per block of query rows.
  const bool pack = !decoding && p.seqlen_k >= kPackKeys && p.batch * p.heads >= 2 * threads;
  const int packed_keys = pack ? p.seqlen_k : 0;
  const int decode_lanes = round_up(decode_heads, kVecFloats);
  const size_t scratch_floats = decoding ? Decode_scratch(Carver(nullptr), dp, p.seqlen_k, decode_lanes).floats
                                         : Fwd_scratch(Carver(nullptr), dp, p.seqlen_k, 1, packed_keys).floats;
  const int m_blocks = decoding ? key_parts : pack ? 1 : (p.seqlen_q + kBlockM - 1) / kBlockM;
  float* partials = key_parts > 1 ? split_partials(size_t(p.batch) * key_parts * p.heads * kDirectRows * (2 + d)) : nullptr;
  Region_errors errors;
  #pragma omp parallel if (parallel)
  {
    #pragma omp for collapse(3) schedule(dynamic)
    for (int b = 0; b < p.batch; ++b) {
      for (int ht = 0; ht < head_tasks; ++ht) {
        for (int mb = 0; mb < m_blocks; ++mb) {
          errors.run([&] {
            const Flash_seq seq = Flash_seq::of(p, b);
            if (decoding) {
              const Decode_scratch w(Carver(thread_scratch(scratch_floats)), dp, p.seqlen_k, decode_lanes);
              const int h0 = ht * decode_heads;
              decode_task<T>(p, b, h0, std::min(decode_heads, p.heads - h0), seq, dp, w, Key_split{mb, key_parts, d, partials});
              return;
            }
            const Fwd_scratch w(Carver(thread_scratch(scratch_floats)), dp, p.seqlen_k, 1, packed_keys);
            if (pack) {
              for (int r0 = 0; r0 < seq.seqlen_q; r0 += kBlockM) {
                const int rows = std::min(kBlockM, seq.seqlen_q - r0);
                if (rows <= kDirectRows) {
                  attend_rows<T>(p, b, ht, 1, r0, rows, seq, dp, w);
                  continue;
                }
                const Query_block qb{b, ht, p.kv_head(ht), r0, rows, round_up(rows, kMicroCols), d, dp, seq, seq.mask(p)};
                if (r0 == 0) pack_keys<T>(p, qb, w);
                forward_tiles<T>(p, qb, w, true);
              }
              return;
            }
            const int r0 = mb * kBlockM;
            if (r0 >= seq.seqlen_q) return;
            const int rows = std::min(kBlockM, seq.seqlen_q - r0);
            if (rows <= kDirectRows) return attend_rows<T>(p, b, ht, 1, r0, rows, seq, dp, w);
            const Query_block qb{b, ht, p.kv_head(ht), r0, rows, round_up(rows, kMicroCols), d, dp, seq, seq.mask(p)};
            forward_tiles<T>(p, qb, w);
          });
        }
      }
    }
    if (key_parts > 1) {  // every thread reaches this loop (key_parts is the same for all)
      #pragma omp for collapse(2) schedule(static)
      for (int b = 0; b < p.batch; ++b) {
        for (int h = 0; h < p.heads; ++h) {
          errors.run([&] { merge_parts<T>(p, b, h, Key_split{0, key_parts, d, partials}); });
        }
      }
    }
  }
  errors.rethrow();
}

// ============================================================================= backward

// A backward task's working set: one head's whole query side, one kv head's whole dk / dv.
struct Bwd_scratch {
  float* q;          // sq_p x dp each: Q, Q^T and dO^T (per block of kBlockM queries), dO, the dQ accumulator
  float* q_t;
  float* dout;
  float* dout_t;
  float* dq;
  float* d_rows;     // sq_p each: D = rowsum(dO * O), the forward's LSE
  float* lse;
  uint32_t* hashes;  // sq_p: dropout row hashes
  float* dk;         // sk_p x dp each: the kv head's gradients, summed over its query heads
  float* dv;
  float* k;          // kBlockN x dp each
  float* v;
  float* s;          // kBlockN x kBlockM each: S^T then dS^T, dP^T, P^T
  float* dp_t;
  float* p_t;

  Bwd_scratch(Carver&& c, int dp, int sq_p, int sk_p)
      : q(c.take(size_t(sq_p) * dp)), q_t(c.take(size_t(sq_p) * dp)), dout(c.take(size_t(sq_p) * dp)),
        dout_t(c.take(size_t(sq_p) * dp)), dq(c.take(size_t(sq_p) * dp)), d_rows(c.take(sq_p)), lse(c.take(sq_p)),
        hashes(c.take_u32(sq_p)), dk(c.take(size_t(sk_p) * dp)), dv(c.take(size_t(sk_p) * dp)),
        k(c.take(kBlockN * dp)), v(c.take(kBlockN * dp)), s(c.take(kBlockN * kBlockM)), dp_t(c.take(kBlockN * kBlockM)),
        p_t(c.take(kBlockN * kBlockM)), floats(c.used()) {}
  size_t floats;
};

// Head h's queries, output gradients, D and LSE, and a zero dQ. Returns whether Q, dO and D
// are all finite.
template <typename T>
bool load_head(const Flash_params& p, int b, int h, const Flash_seq& seq, int dp, int sq_p, const Bwd_scratch& w) {
  const int d = p.head_dim, sq = seq.seqlen_q;
  const T* q = static_cast<const T*>(p.q) + seq.q_offset(p, b, h, 0, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  const T* dout = static_cast<const T*>(p.dout) + seq.q_offset(p, b, h, 0, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  const T* out = static_cast<const T*>(p.out) + seq.q_offset(p, b, h, 0, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  bool finite = load_tile<T, true>(q, p.q_row_stride, sq, d, w.q, dp, sq_p);
  finite &= load_tile<T, true>(dout, p.dout_row_stride, sq, d, w.dout, dp, sq_p);
  // Q^T and dO^T per block of kBlockM queries ([block][c][i], pitch kBlockM): the S^T and dP^T
  // products read a block's dp rows of B 256 bytes apart. (One sq_p-wide transpose put them
  // sq_p * 4 bytes apart, 8 KiB at seqlen 2048: every row in the same L1 set, re-read from L2
  // at each k step; AVX2's narrower column blocks re-read them twice as often.)
  for (int m0 = 0; m0 < sq_p; m0 += kBlockM) {
    transpose(w.q + size_t(m0) * dp, kBlockM, dp, w.q_t + size_t(m0) * dp);
    transpose(w.dout + size_t(m0) * dp, kBlockM, dp, w.dout_t + size_t(m0) * dp);
  }
  float nonfinite = 0.f;
  prefetch_first_rows(out, p.out_row_stride, sq, d);
  for (int i = 0; i < sq_p; ++i) {  // D_i = rowsum(dO * O), the softmax backward's correction
    prefetch_ahead(out, p.out_row_stride, i, sq, d);
    w.d_rows[i] = i < sq ? row_dot(w.dout + size_t(i) * dp, out + i * p.out_row_stride, d) : 0.f;
    nonfinite += w.d_rows[i] * 0.f;
    w.lse[i] = i < sq ? p.lse[seq.lse_index(p, b, h, i)] : flash::kInf;
    w.hashes[i] = p.dropout.row_hash(uint32_t(b * p.heads + h), uint32_t(i));
  }
  std::fill(w.dq, w.dq + size_t(sq_p) * dp, 0.f);
  return finite && nonfinite == 0.f;
}

// From S^T (raw scores) and dP^T of the pair: P^T (dropped out) into p_t and dS^T (scaled,
// through softcap) into s, by flash_math.h's prob_from_lse, softmax_grad and softcap_grad.
// Masked entries get P = 0; in a banded pair (finite inputs) also dS = 0 without reading them
// (S^T and dP^T were computed only where the band needs them).
void score_grads(const Flash_params& p, const Tile_cut& cut, int c0, int n, int m0, const Bwd_scratch& w) {
  constexpr int M = kBlockM;
  if (p.softcap == 0.f && !p.dropout.enabled()) {  // the common case, a register of queries at a time
    for (int j = 0; j < n; ++j) {
      float* sj = w.s + j * M;
      float* pj = w.p_t + j * M;
      const float* dpj = w.dp_t + j * M;
      const int ib = cut.whole ? 0 : cut.key_begin[j], ie = cut.whole ? M : cut.key_end[j];
      for (int i = 0; i < M; i += kVecFloats) {
        if (cut.banded && (i + kVecFloats <= ib || i >= ie)) {  // no query of this register sees key j
          store_vec(pj + i, VecN{});
          store_vec(sj + i, VecN{});
          continue;
        }
        const VecN l = load_vec(w.lse + m0 + i), x = load_vec(sj + i) * p.scale;
        VecN prob = l != flash::kInf ? exp2_nonpositive((x - l) * flash::kLog2e) : VecN{};
        if (!cut.whole) prob = keep_lanes(prob, i, ib, ie, VecN{});
        store_vec(pj + i, prob);
        store_vec(sj + i, prob * (load_vec(dpj + i) - load_vec(w.d_rows + m0 + i)) * p.scale);
      }
    }
    return;
  }
  for (int j = 0; j < n; ++j) {
    float* sj = w.s + j * M;
    float* pj = w.p_t + j * M;
    const float* dpj = w.dp_t + j * M;
    const int ib = cut.whole ? 0 : cut.key_begin[j], ie = cut.whole ? M : cut.key_end[j];
    for (int i = 0; i < M; ++i) {
      if (cut.banded && (i < ib || i >= ie)) {
        pj[i] = sj[i] = 0.f;
        continue;
      }
      const float capped = flash::apply_softcap(sj[i] * p.scale, p.softcap);
      const float l = w.lse[m0 + i];
      const bool on = i >= ib && i < ie && l != flash::kInf;
      const float prob = on ? exp2_nonpositive((capped - l) * flash::kLog2e) : 0.f;
      float kept = prob, dprob = dpj[i];
      if (p.dropout.enabled()) {
        const bool keep = p.dropout.keep(w.hashes[m0 + i], uint32_t(c0 + j));
        kept = keep ? prob * p.dropout.scale : 0.f;
        dprob = keep ? dprob * p.dropout.scale : 0.f;
      }
      pj[i] = kept;
      sj[i] = flash::softmax_grad(prob, dprob, w.d_rows[m0 + i]) * flash::softcap_grad(capped, p.softcap) * p.scale;
    }
  }
}

// dV += P^T dO, dK += dS^T Q (keys [c0, c0 + n)), dQ += dS K (queries [m0, m0 + m)); in a cut
// banded pair each key row sums only the queries that see it, each query row only the keys it sees.
void accumulate_grads(int dp, int c0, int n, int m0, int m, const Tile_cut& cut, const Bwd_scratch& w) {
  constexpr int M = kBlockM;
  float* dk = w.dk + size_t(c0) * dp;
  float* dv = w.dv + size_t(c0) * dp;
  constexpr Band kDepth = Band::kDepth;
  tile_gemm<C_init::kAdd, kDepth>(
      {w.p_t, M, 1, w.dout + size_t(m0) * dp, dp, dv, dp, m, nullptr, cut.keys_begin(), cut.keys_end()}, n, dp);
  tile_gemm<C_init::kAdd, kDepth>(
      {w.s, M, 1, w.q + size_t(m0) * dp, dp, dk, dp, m, nullptr, cut.keys_begin(), cut.keys_end()}, n, dp);
  tile_gemm<C_init::kAdd, kDepth>(
      {w.s, 1, M, w.k, dp, w.dq + size_t(m0) * dp, dp, n, nullptr, cut.queries_begin(), cut.queries_end()}, m, dp);
}

template <typename T>
void backward_head(const Flash_params& p, int b, int h, const Flash_seq& seq, int dp, int sq_p, const Bwd_scratch& w) {
  constexpr int M = kBlockM, N = kBlockN;
  const int d = p.head_dim, kvh = p.kv_head(h), sq = seq.seqlen_q, sk = seq.seqlen_k;
  const flash::Mask mask = seq.mask(p);
  const bool head_finite = load_head<T>(p, b, h, seq, dp, sq_p, w);
  for (int c0 = 0; c0 < sk; c0 += N) {
    const int n = std::min(N, sk - c0);
    int r_begin, r_end;
    mask.row_range(c0, c0 + n, &r_begin, &r_end);
    if (r_begin >= r_end) continue;
    bool finite = head_finite;
    finite &= load_tile<T, true>(
        static_cast<const T*>(p.k) + seq.k_offset(p, b, kvh, c0, p.k_batch_stride, p.k_row_stride, p.k_head_stride),
        p.k_row_stride, n, d, w.k, dp, n);
    finite &= load_tile<T, true>(
        static_cast<const T*>(p.v) + seq.k_offset(p, b, kvh, c0, p.v_batch_stride, p.v_row_stride, p.v_head_stride),
        p.v_row_stride, n, d, w.v, dp, n);
    for (int m0 = r_begin / M * M; m0 < r_end; m0 += M) {
      const Tile_cut cut(mask, sq, c0, n, m0, finite);
      constexpr Band kColumns = Band::kColumns;  // a banded pair computes the scores its keys' queries need
      tile_gemm<C_init::kZero, kColumns>(  // S^T = K Q^T
          {w.k, dp, 1, w.q_t + size_t(m0) * dp, M, w.s, M, dp, nullptr, cut.keys_begin(), cut.keys_end()}, n, M);
      tile_gemm<C_init::kZero, kColumns>(  // dP^T = V dO^T
          {w.v, dp, 1, w.dout_t + size_t(m0) * dp, M, w.dp_t, M, dp, nullptr, cut.keys_begin(), cut.keys_end()}, n, M);
      score_grads(p, cut, c0, n, m0, w);
      accumulate_grads(dp, c0, n, m0, std::min(M, sq - m0), cut, w);
    }
  }
  T* dq = static_cast<T*>(p.dq) + seq.q_offset(p, b, h, 0, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  store_tile(w.dq, dp, sq, d, dq, p.dq_row_stride);
}

template <typename T>
void backward_typed(const Flash_params& p) {
  const int d = p.head_dim, dp = round_up(d, kMicroCols);
  const int group = p.heads / p.kv_heads;
  const double macs = 5.0 * p.batch * p.heads * double(p.seqlen_q) * p.seqlen_k * dp;
  const int max_q = round_up(std::max(p.seqlen_q, 1), kBlockM), max_k = round_up(std::max(p.seqlen_k, 1), kBlockN);
  const size_t scratch_floats = Bwd_scratch(Carver(nullptr), dp, max_q, max_k).floats;
  Region_errors errors;
  #pragma omp parallel for collapse(2) schedule(dynamic) if (macs > kParallelMacs)
  for (int b = 0; b < p.batch; ++b) {
    for (int kvh = 0; kvh < p.kv_heads; ++kvh) {
      errors.run([&] {
        const Flash_seq seq = Flash_seq::of(p, b);
        const int sq_p = round_up(std::max(seq.seqlen_q, 1), kBlockM), sk = seq.seqlen_k;
        // The thread's scratch persists across calls (allocating it per call cost page faults
        // and a zeroing pass every backward).
        const Bwd_scratch w(Carver(thread_scratch(scratch_floats)), dp, sq_p, round_up(std::max(sk, 1), kBlockN));
        std::fill(w.dk, w.dk + size_t(sk) * dp, 0.f);
        std::fill(w.dv, w.dv + size_t(sk) * dp, 0.f);
        for (int h = kvh * group; h < (kvh + 1) * group; ++h) backward_head<T>(p, b, h, seq, dp, sq_p, w);
        T* dk = static_cast<T*>(p.dk) + seq.k_offset(p, b, kvh, 0, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
        T* dv = static_cast<T*>(p.dv) + seq.k_offset(p, b, kvh, 0, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
        store_tile(w.dk, dp, sk, d, dk, p.dk_row_stride);
        store_tile(w.dv, dp, sk, d, dv, p.dv_row_stride);
      });
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
