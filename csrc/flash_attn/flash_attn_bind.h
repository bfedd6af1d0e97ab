// Argument checks and the one Flash_params builder, shared by the CPU glue (flash_attn_ops.cpp)
// and the CUDA glue (flash_attn_cuda_ops.cpp, also compiled into the SIMT emulator).
#pragma once
#include <ATen/ATen.h>

#include <climits>
#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include "common/bind_utils.h"
#include "common/op_args.h"
#include "flash_attn/flash.h"
#include "flash_attn/flash_plan.h"

namespace phi {

// (batch, row, head) element strides of a dense (b, s, h, d) or packed (total, h, d) tensor.
inline void strides_of(const at::Tensor& t, bool varlen, int64_t& batch, int64_t& row, int64_t& head) {
  batch = varlen ? 0 : t.stride(0);
  row = t.stride(varlen ? 0 : 1);
  head = t.stride(-2);
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in head_dim (last dim)");
}

// cu_seqlens in host memory (the CPU kernels, and the CUDA kernels under the SIMT emulator):
// the kernels index rows through them, so they must start at 0, be non-decreasing with lengths
// within max_seqlen, and end at the packed row counts of q and k. (On a GPU the glue cannot read
// them without a device sync; the Python API checks the same before the launch.)
inline void check_cu_seqlens_host(const Flash_params& p, int64_t total_k) {
  const int32_t* cq = p.cu_seqlens_q;
  const int32_t* ck = p.cu_seqlens_k;
  TORCH_CHECK(cq[0] == 0, "cu_seqlens_q must start at 0, got ", cq[0]);
  TORCH_CHECK(ck[0] == 0, "cu_seqlens_k must start at 0, got ", ck[0]);
  for (int b = 0; b < p.batch; ++b) {
    const int64_t lq = int64_t(cq[b + 1]) - cq[b], lk = int64_t(ck[b + 1]) - ck[b];
    TORCH_CHECK(lq >= 0 && lq <= p.seqlen_q, "cu_seqlens_q must be non-decreasing with lengths <= max_seqlen_q (",
                p.seqlen_q, "), sequence ", b, " has ", lq);
    TORCH_CHECK(lk >= 0 && lk <= p.seqlen_k, "cu_seqlens_k must be non-decreasing with lengths <= max_seqlen_k (",
                p.seqlen_k, "), sequence ", b, " has ", lk);
  }
  TORCH_CHECK(cq[p.batch] == p.total_q, "cu_seqlens_q must end at the ", p.total_q, " rows of q, got ", cq[p.batch]);
  TORCH_CHECK(ck[p.batch] == total_k, "cu_seqlens_k must end at the ", total_k, " rows of k, got ", ck[p.batch]);
}

// seqused_k (forward only): int32 (batch,), sequence b attends to its first seqused_k[b] keys.
inline void add_seqused_k(Flash_params& p, const std::optional<at::Tensor>& seqused_k, const at::Tensor& q) {
  if (!seqused_k.has_value()) return;
  const at::Tensor& s = *seqused_k;
  TORCH_CHECK(s.scalar_type() == at::kInt && s.dim() == 1 && s.is_contiguous() && s.numel() == p.batch,
              "seqused_k must be a contiguous int32 tensor of shape (batch,) = (", p.batch, ",), got ",
              s.scalar_type(), s.sizes());
  PHI_CHECK_DEVICE(s, q);
  p.seqused_k = device_ptr<int32_t>(s, "seqused_k");
  if (s.is_cpu()) {  // host memory (CPU kernels, SIMT emulator): the kernels index keys through it
    for (int b = 0; b < p.batch; ++b) {
      const int64_t avail = p.is_varlen() ? int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b] : p.seqlen_k;
      TORCH_CHECK(p.seqused_k[b] >= 0 && p.seqused_k[b] <= avail, "seqused_k[", b, "] = ", p.seqused_k[b],
                  " must be in [0, ", avail, "] (the keys sequence ", b, " has)");
    }
  }
}

// The one builder of Flash_params: every flash attention op (forward, backward, the CUDA plan;
// CPU, CUDA and emulated) reads its q, k, v, out, lse and its options (PHI_FLASH_ATTN_OPTIONS in
// op_schemas.h) here, by name. Checks what the kernels rely on; the Python API has already given
// friendlier errors.
inline Flash_params make_params(const Op_args& a) {
  const at::Tensor& q = a.tensor("q");
  const at::Tensor& k = a.tensor("k");
  const at::Tensor& v = a.tensor("v");
  const at::Tensor& out = a.tensor("out");
  const at::Tensor& lse = a.tensor("lse");
  const std::optional<at::Tensor> cu_q = a.optional_tensor("cu_seqlens_q");
  const std::optional<at::Tensor> cu_k = a.optional_tensor("cu_seqlens_k");
  const int64_t max_q = a.integer("max_seqlen_q"), max_k = a.integer("max_seqlen_k");
  const double scale = a.real("softmax_scale"), softcap = a.real("softcap"), dropout_p = a.real("dropout_p");
  const int64_t window_left = a.integer("window_left"), window_right = a.integer("window_right");
  const int64_t seed = a.integer("seed");
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(cu_k.has_value() == varlen, "cu_seqlens_q and cu_seqlens_k must be given together");
  const int64_t nd = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == nd && k.dim() == nd, "q and k must be ", nd, "-D, got ", q.dim(), "-D and ", k.dim(), "-D");
  check_like(v, "v", k, "k");
  check_like(out, "out", q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype");
  PHI_CHECK_DEVICE(k, q);
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1, "q and k must be contiguous in head_dim");
  TORCH_CHECK(k.size(-1) == q.size(-1), "k's head_dim must equal q's");
  const int64_t heads = q.size(-2), kv_heads = k.size(-2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window sizes must be >= -1");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1)");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0 disables it), got ", softcap);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "softmax_scale must be finite and > 0, got ", scale);
  TORCH_CHECK(std::isfinite(float(scale)) && float(scale) > 0 && std::isfinite(float(softcap)),
              "softmax_scale and softcap must be representable as positive finite float32, got ", scale, " and ",
              softcap);
  TORCH_CHECK(window_left <= INT_MAX && window_right <= INT_MAX, "window sizes must be <= 2^31 - 1");

  Flash_params p{};
  p.q = device_ptr(q, "q");
  p.k = device_ptr(k, "k");
  p.v = device_ptr(v, "v");
  p.out = device_ptr(out, "out");
  p.dtype = to_phi_dtype(q, "q");
  p.heads = int(heads);
  p.kv_heads = int(kv_heads);
  p.head_dim = int(q.size(-1));
  strides_of(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides_of(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides_of(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides_of(out, varlen, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  if (varlen) {
    for (const at::Tensor* cu : {&*cu_q, &*cu_k}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->numel() >= 2,
                  "cu_seqlens must be contiguous int32 tensors of shape (batch + 1,)");
      PHI_CHECK_DEVICE((*cu), q);
    }
    TORCH_CHECK(cu_q->numel() == cu_k->numel(), "cu_seqlens_q and cu_seqlens_k must have the same length");
    TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q <= INT_MAX && max_k <= INT_MAX,
                "max_seqlen_q and max_seqlen_k must be in [0, 2^31 - 1], got ", max_q, " and ", max_k);
    p.cu_seqlens_q = device_ptr<int32_t>(*cu_q, "cu_seqlens_q");
    p.cu_seqlens_k = device_ptr<int32_t>(*cu_k, "cu_seqlens_k");
    p.batch = int(cu_q->numel() - 1);
    p.seqlen_q = int(max_q);
    p.seqlen_k = int(max_k);
    p.total_q = int(q.size(0));
    PHI_CHECK_SHAPE(lse, heads, q.size(0));
    if (q.is_cpu()) check_cu_seqlens_host(p, k.size(0));
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), "q and k must have the same batch size");
    p.batch = int(q.size(0));
    p.seqlen_q = int(q.size(1));
    p.seqlen_k = int(k.size(1));
    p.total_q = p.batch * p.seqlen_q;
    PHI_CHECK_SHAPE(lse, q.size(0), heads, q.size(1));
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be a contiguous float32 tensor");
  PHI_CHECK_DEVICE(lse, q);
  p.lse = device_ptr<float>(lse, "lse");
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.window_left = int(window_left);
  p.window_right = int(window_right);
  p.dropout = flash::Dropout::make(uint64_t(seed), dropout_p);
  add_seqused_k(p, a.optional_tensor("seqused_k"), q);
  return p;
}

inline void add_backward(Flash_params& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const bool varlen = p.is_varlen();
  TORCH_CHECK(p.seqused_k == nullptr,
              "flash attention's backward takes no seqused_k (the KV-cache path is inference only)");
  check_like(dout, "dout", q, "q");
  check_like(dq, "dq", q, "q");
  check_like(dk, "dk", k, "k");
  check_like(dv, "dv", k, "k");
  p.dout = device_ptr(dout, "dout");
  p.dq = device_ptr(dq, "dq");
  p.dk = device_ptr(dk, "dk");
  p.dv = device_ptr(dv, "dv");
  strides_of(dout, varlen, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  strides_of(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides_of(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides_of(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
}

inline void check_cuda_supported(const Flash_params& p, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const std::string why = flash::cuda_unsupported(p);
  TORCH_CHECK(why.empty(), "flash attention (cuda backend) does not support ", why);
  for (const auto& [name, t] : ts) {  // cp.async moves 16-byte chunks: rows must be 16-byte aligned
    const bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 &&
                         t->stride(-2) % 8 == 0 && t->stride(-3) % 8 == 0 && (t->dim() < 4 || t->stride(0) % 8 == 0);
    TORCH_CHECK(aligned, "flash attention (cuda backend): ", name,
                " must have 16-byte aligned rows (data pointer and strides multiples of 8 elements), got strides ",
                t->strides());
  }
}

}  // namespace phi
