// The math of flash attention that does not depend on how a tile is laid out in registers:
// which keys a query row sees, the online-softmax update, the log-sum-exp, softcap and its
// derivative, and the dropout hash. It is PHI_HOST_DEVICE code: the CUDA kernels
// (flash_fwd_kernel.cuh, flash_bwd_kernel.cuh) and the CPU kernels (flash_attn_cpu.cpp) call
// the same functions, so the CPU tests exercise the exact rules the GPU runs. The semantics
// are those of the oracle, phi_kernels/reference/flash_attn.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace phi::flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = INFINITY;

// ----------------------------------------------------------------------------- masking
//
// Key j (0-based within its sequence) is visible from query row i iff
//     i + sk - sq - left <= j <= i + sk - sq + right
// (bottom-right aligned, so a query block that is the tail of a KV cache sees the whole
// cache), with -1 meaning unbounded; causal is right = 0.

struct Mask {
  int seqlen_q, seqlen_k, left, right;

  PHI_HOST_DEVICE int diagonal(int row) const { return row + seqlen_k - seqlen_q; }

  PHI_HOST_DEVICE bool visible(int row, int col) const {
    const int d = diagonal(row);
    return col < seqlen_k && (left < 0 || col >= d - left) && (right < 0 || col <= d + right);
  }

  // The keys rows [row_begin, row_end) can see, as a half-open column range [*begin, *end),
  // clamped to [0, seqlen_k); empty (begin >= end) when none. Kernels loop over the key tiles
  // in this range only, which is what makes causal attention cost half of full attention.
  PHI_HOST_DEVICE void key_range(int row_begin, int row_end, int* begin, int* end) const {
    const int lo = left < 0 ? 0 : diagonal(row_begin) - left;
    const int hi = right < 0 ? seqlen_k : diagonal(row_end - 1) + right + 1;
    *begin = lo < 0 ? 0 : lo;
    *end = hi > seqlen_k ? seqlen_k : hi;
  }

  // The rows that see at least one key of [col_begin, col_end), as [*begin, *end) clamped
  // to [0, seqlen_q): the query tiles a key tile meets in the backward.
  PHI_HOST_DEVICE void row_range(int col_begin, int col_end, int* begin, int* end) const {
    const int shift = seqlen_k - seqlen_q;  // diagonal(row) = row + shift
    const int lo = right < 0 ? 0 : col_begin - right - shift;
    const int hi = left < 0 ? seqlen_q : col_end - 1 + left - shift + 1;
    *begin = lo < 0 ? 0 : lo;
    *end = hi > seqlen_q ? seqlen_q : hi;
  }

  // True when every (row, col) of the tile [row_begin, row_end) x [col_begin, col_end) is
  // visible: such tiles skip the per-element mask (most tiles of a long causal sequence).
  PHI_HOST_DEVICE bool tile_all_visible(int row_begin, int row_end, int col_begin, int col_end) const {
    if (col_end > seqlen_k || row_end > seqlen_q) return false;
    const bool left_ok = left < 0 || col_begin >= diagonal(row_end - 1) - left;
    const bool right_ok = right < 0 || col_end - 1 <= diagonal(row_begin) + right;
    return left_ok && right_ok;
  }
};

// ----------------------------------------------------------------------------- scores

// softcap * tanh(s / softcap), applied to the scaled score; identity when softcap == 0.
PHI_HOST_DEVICE float apply_softcap(float s, float softcap) {
  return softcap > 0.f ? softcap * tanhf(s / softcap) : s;
}

// d(capped)/d(s) expressed through the capped value c: 1 - tanh^2 = 1 - (c / softcap)^2.
PHI_HOST_DEVICE float softcap_grad(float capped, float softcap) {
  if (softcap <= 0.f) return 1.f;
  const float t = capped / softcap;
  return 1.f - t * t;
}

// ----------------------------------------------------------------------------- online softmax
//
// A row keeps its running max m (of scaled scores, in log2 units) and running sum l of
// exp2(s - m). A new tile with max m_tile rescales the old sum and output by
// exp2(m_old - m_new). All-masked rows keep m = -inf; comparing against -inf instead of
// subtracting it avoids the NaN of (-inf) - (-inf).
//
// Non-finite inputs (the rule every backend and the oracle follow): a key a row cannot see
// (masked by causal / window / seqused_k / the sequence end) never affects that row, whatever
// its k and v hold; a NaN the row sees (in its q, or in the k of a visible key) makes the whole
// output row and its LSE NaN, a NaN in v[j][c] of a visible key j makes out[row][c] NaN. A row
// that sees no key outputs 0 (LSE +inf) whatever its q holds.

struct OnlineSoftmax {
  float max = -kInf;  // running max of scores * log2(e)
  float sum = 0.f;    // running sum of exp2(score * log2(e) - max)

  // Moves the max to include `tile_max` and returns the factor the old sum and the output
  // accumulator must be multiplied by.
  PHI_HOST_DEVICE float rescale(float tile_max) {
    const float new_max = tile_max > max ? tile_max : max;
    const float factor = new_max == -kInf ? 1.f : exp2f(max - new_max);
    sum *= factor;
    max = new_max;
    return factor;
  }

  // exp2 of a (log2-scaled) score relative to the running max; 0 for masked scores. A NaN
  // score (NaN in q or in a visible key) stays NaN: the max skips NaNs (fmaxf), so a row whose
  // every visible score is NaN still has max == -inf, and must not pass for a row that sees
  // no key.
  PHI_HOST_DEVICE float prob(float score_log2) const {
    return max == -kInf ? (score_log2 != score_log2 ? score_log2 : 0.f) : exp2f(score_log2 - max);
  }

  // 1 / sum, the output's final scale; 0 for rows that saw no key (their output is 0); NaN
  // when a visible score was NaN (the whole row is then NaN, as the oracle's).
  PHI_HOST_DEVICE float inv_sum() const { return sum > 0.f ? 1.f / sum : (sum != sum ? sum : 0.f); }

  // Natural-log LSE of the row's scaled scores; +inf for a row that saw no key, so that the
  // backward's exp(s - lse) is 0 there; NaN for a row that saw a NaN score.
  PHI_HOST_DEVICE float lse() const { return sum > 0.f ? (max + log2f(sum)) / kLog2e : (sum != sum ? sum : kInf); }
};

// Probability of a (scaled, capped) score from the forward's LSE, in the backward.
PHI_HOST_DEVICE float prob_from_lse(float score, float lse) {
  return lse == kInf ? 0.f : exp2f((score - lse) * kLog2e);
}

// dS = P * (dP - D), D = rowsum(dO * O): the softmax backward of one element.
PHI_HOST_DEVICE float softmax_grad(float p, float dp, float d_row) { return p * (dp - d_row); }

// ----------------------------------------------------------------------------- dropout
//
// h = mix(mix(mix(seed ^ bh * 0x9E3779B9) ^ row) ^ col); kept iff (h >> 8) / 2^24 >= p.
// Identical to phi_kernels/reference/flash_attn.py::dropout_keep_mask, so the reference
// reproduces a kernel's mask exactly. bh = batch * heads + head.

PHI_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

struct Dropout {
  uint32_t seed;
  uint32_t threshold;  // keep iff (h >> 8) >= threshold, threshold = ceil(p * 2^24)
  float scale;         // 1 / (1 - p)

  // Host side (the bindings build it once per call). p is a double like the reference's.
  static Dropout make(uint64_t seed, double p) {
    // (h >> 8) / 2^24 >= p  <=>  (h >> 8) >= p * 2^24  <=>  (h >> 8) >= ceil(p * 2^24)
    const double t = std::ceil(p * 16777216.0);
    return Dropout{uint32_t(seed), uint32_t(t), p > 0 ? float(1.0 / (1.0 - p)) : 1.f};
  }

  PHI_HOST_DEVICE bool enabled() const { return threshold > 0; }

  PHI_HOST_DEVICE uint32_t row_hash(uint32_t bh, uint32_t row) const {
    return mix32(mix32(seed ^ (bh * 0x9E3779B9u)) ^ row);
  }

  PHI_HOST_DEVICE bool keep(uint32_t row_hash_value, uint32_t col) const {
    return (mix32(row_hash_value ^ col) >> 8) >= threshold;
  }
};

}  // namespace phi::flash
