// Argument checks and Rotary_params filling shared by the CPU glue (rotary_ops.cpp) and the
// CUDA glue (rotary_cuda_ops.cpp, also compiled into the SIMT emulator).
#pragma once
#include <optional>

#include "common/bind_utils.h"
#include "rotary/rotary.h"

namespace phi {

inline Rotary_params make_rotary_params(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset,
                                 const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                 bool interleaved, bool conjugate, const at::Tensor& out) {
  const bool is_varlen = cu_seqlens.has_value();
  TORCH_CHECK(x.dim() == (is_varlen ? 3 : 4), "x must be ", is_varlen ? 3 : 4, "-D, got ", x.dim(), "-D");
  TORCH_CHECK(out.sizes() == x.sizes(), "out must have the shape of x ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type(),
              "x, cos, sin and out must share a dtype");
  PHI_CHECK_DEVICE(cos, x);
  PHI_CHECK_DEVICE(sin, x);
  PHI_CHECK_DEVICE(out, x);
  TORCH_CHECK(x.stride(-1) == 1 && out.stride(-1) == 1, "x and out must be contiguous in head_dim");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "cos and sin must be contiguous (seqlen_ro, rotary_dim / 2) tensors");

  Rotary_params p{};
  p.x_ptr = device_ptr(x, "x");
  p.out_ptr = device_ptr(out, "out");
  p.cos_ptr = device_ptr(cos, "cos");
  p.sin_ptr = device_ptr(sin, "sin");
  p.dtype = to_phi_dtype(x, "x");
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  p.is_varlen = is_varlen;
  p.inplace = x.data_ptr() == out.data_ptr();
  p.head_dim = int(x.size(-1));
  p.nheads = int(x.size(-2));
  p.rotary_dim = int(cos.size(1)) * 2;
  p.seqlen_ro = int(cos.size(0));
  TORCH_CHECK(p.rotary_dim <= p.head_dim, "rotary_dim (2 * cos.size(1)) must be <= head_dim");
  if (is_varlen) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous() && cu.numel() >= 2,
                "cu_seqlens must be a contiguous int32 tensor of shape (batch + 1,)");
    PHI_CHECK_DEVICE(cu, x);
    p.cu_seqlens = device_ptr<int32_t>(cu, "cu_seqlens");
    p.batch = int(cu.numel() - 1);
    p.seqlen = int(max_seqlen);
    p.x_batch_stride = p.out_batch_stride = 0;
    p.x_row_stride = x.stride(0);
    p.out_row_stride = out.stride(0);
  } else {
    p.batch = int(x.size(0));
    p.seqlen = int(x.size(1));
    p.x_batch_stride = x.stride(0);
    p.out_batch_stride = out.stride(0);
    p.x_row_stride = x.stride(1);
    p.out_row_stride = out.stride(1);
  }
  p.x_head_stride = x.stride(-2);
  p.out_head_stride = out.stride(-2);
  p.seqlen_offset = int(seqlen_offset);
  if (seqlen_offsets.has_value()) {
    const at::Tensor& so = *seqlen_offsets;
    TORCH_CHECK(so.scalar_type() == at::kInt && so.dim() == 1 && so.numel() == p.batch && so.is_contiguous(),
                "seqlen_offsets must be a contiguous int32 tensor of shape (batch,)");
    PHI_CHECK_DEVICE(so, x);
    p.seqlen_offsets = device_ptr<int32_t>(so, "seqlen_offsets");
  }
  return p;
}

}  // namespace phi
