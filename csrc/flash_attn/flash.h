// Flash attention: the params struct every kernel sees (raw pointers and element strides, no
// ATen) and the per-sequence addressing shared by the CPU and CUDA kernels. The bindings in
// flash_attn_ops.cpp fill it.
//
// Layouts (strides in elements, head_dim contiguous):
//   dense : q/out/dq (batch, seqlen_q, heads, d), k/v/dk/dv (batch, seqlen_k, kv_heads, d),
//           lse (batch, heads, seqlen_q) contiguous;
//   varlen: q (total_q, heads, d), k/v (total_k, kv_heads, d), sequence b at rows
//           cu_seqlens[b] .. cu_seqlens[b + 1]; lse (heads, total_q) contiguous.
// GQA: query head h reads kv head h / (heads / kv_heads).
#pragma once
#include <cstdint>

#include "common/macros.h"
#include "flash_attn/flash_math.h"

namespace phi {

struct Flash_params {
  // Forward inputs / outputs.
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  // Backward (unused by the forward).
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;   // CUDA: fp32 (batch, seqlen_q_rounded, heads, d) atomics target
  float* d_rows;     // CUDA: fp32 rowsum(dout * out), laid out like lse

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int64_t dout_batch_stride, dout_row_stride, dout_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  const int32_t* cu_seqlens_q;  // (batch + 1,) or nullptr for the dense layout
  const int32_t* cu_seqlens_k;
  // Forward only, or nullptr: sequence b uses only its first seqused_k[b] keys (a KV cache
  // filled to different lengths per row: flash_attn_with_kvcache's cache_seqlens).
  const int32_t* seqused_k;
  int batch, heads, kv_heads, head_dim;
  int seqlen_q, seqlen_k;  // the max over sequences when varlen
  int total_q;             // rows of q (varlen) = batch * seqlen_q (dense): lse's row count per head

  float scale;    // softmax scale applied to q k^T
  float softcap;  // 0 = off
  int window_left, window_right;  // -1 = unbounded; causal is right = 0
  flash::Dropout dropout;
  DType dtype;

  PHI_HOST_DEVICE bool is_varlen() const { return cu_seqlens_q != nullptr; }
  PHI_HOST_DEVICE int kv_head(int head) const { return head / (heads / kv_heads); }
};

// Where sequence b lives: its lengths and first rows (rows of the packed tensor when varlen).
struct Flash_seq {
  int seqlen_q, seqlen_k;
  int64_t q_row0, k_row0;  // packed row of the sequence's first token (0 for dense)

  PHI_HOST_DEVICE static Flash_seq of(const Flash_params& p, int b) {
    Flash_seq s{p.seqlen_q, p.seqlen_k, 0, 0};
    if (p.is_varlen()) {
      s.q_row0 = PHI_LDG(p.cu_seqlens_q + b);
      s.k_row0 = PHI_LDG(p.cu_seqlens_k + b);
      s.seqlen_q = PHI_LDG(p.cu_seqlens_q + b + 1) - int(s.q_row0);
      s.seqlen_k = PHI_LDG(p.cu_seqlens_k + b + 1) - int(s.k_row0);
    }
    if (p.seqused_k != nullptr) s.seqlen_k = PHI_LDG(p.seqused_k + b);  // the masks align to the used keys
    return s;
  }

  PHI_HOST_DEVICE flash::Mask mask(const Flash_params& p) const {
    return {seqlen_q, seqlen_k, p.window_left, p.window_right};
  }

  // Element offsets of row `row` (0-based in the sequence) of batch b, head h.
  PHI_HOST_DEVICE int64_t q_offset(const Flash_params& p, int b, int h, int64_t row, int64_t bs, int64_t rs,
                                   int64_t hs) const {
    return (p.is_varlen() ? 0 : b * bs) + (q_row0 + row) * rs + h * hs;
  }
  PHI_HOST_DEVICE int64_t k_offset(const Flash_params& p, int b, int h, int64_t row, int64_t bs, int64_t rs,
                                   int64_t hs) const {
    return (p.is_varlen() ? 0 : b * bs) + (k_row0 + row) * rs + h * hs;
  }
  // Index of row `row`'s LSE (and D) in the contiguous lse buffer.
  PHI_HOST_DEVICE int64_t lse_index(const Flash_params& p, int b, int h, int64_t row) const {
    return p.is_varlen() ? int64_t(h) * p.total_q + q_row0 + row
                         : (int64_t(b) * p.heads + h) * p.seqlen_q + row;
  }
};

}  // namespace phi
