// Argument checks and Rotary_params filling shared by the CPU glue (rotary_ops.cpp) and the
// CUDA glue (rotary_cuda_ops.cpp, also compiled into the SIMT emulator).
#pragma once
#include <ATen/MemoryOverlap.h>

#include <climits>
#include <optional>

#include "common/bind_utils.h"
#include "common/op_args.h"
#include "rotary/rotary.h"

namespace phi {

// Host-side bounds of what the kernels index, for tensors in host memory (the CPU kernel, and
// the CUDA kernel under the SIMT emulator): cu_seqlens covers the rows of x exactly (starts at
// 0, non-decreasing, ends at the row count; a sequence past the rows would be read and written
// out of bounds, rows past the last sequence would be left unwritten in out), lengths within
// max_seqlen, positions within cos/sin. Then p.seqlen becomes the longest sequence, so a
// max_seqlen far above it costs nothing. On a GPU the Python API checks the same before the
// launch (one read-back), the glue cannot without a device sync.
inline void check_rotary_host(Rotary_params& p, int64_t rows) {
  int longest = 0;
  if (p.is_varlen) {
    TORCH_CHECK(p.cu_seqlens[0] == 0, "cu_seqlens must start at 0, got ", p.cu_seqlens[0]);
    TORCH_CHECK(p.cu_seqlens[p.batch] == rows, "cu_seqlens must end at the ", rows, " rows of x, got ",
                p.cu_seqlens[p.batch]);
  }
  for (int b = 0; b < p.batch; ++b) {
    int64_t start;
    int len;
    rotary_seq_bounds(p, b, start, len);
    TORCH_CHECK(len >= 0 && len <= p.seqlen, "cu_seqlens must be non-decreasing with lengths <= max_seqlen (",
                p.seqlen, "), sequence ", b, " has length ", len);
    TORCH_CHECK(!p.is_varlen || (start >= 0 && start + len <= rows), "cu_seqlens must stay within the ", rows,
                " rows of x, sequence ", b, " covers rows [", start, ", ", start + len, ")");
    const int64_t off = rotary_offset(p, b);
    TORCH_CHECK(off >= 0 && (len == 0 || off + len <= p.seqlen_ro), "seqlen_offsets: sequence ", b,
                " needs cos/sin rows [", off, ", ", off + len, ") but cos has ", p.seqlen_ro);
    longest = len > longest ? len : longest;
  }
  if (p.is_varlen) p.seqlen = longest;
}

// The one builder of Rotary_params: both rotary_out kernels (CPU, CUDA and emulated) read x, cos,
// sin, out and the options (PHI_ROTARY_OPTIONS in op_schemas.h) here, by name.
inline Rotary_params make_rotary_params(const Op_args& a) {
  const at::Tensor& x = a.tensor("x");
  const at::Tensor& cos = a.tensor("cos");
  const at::Tensor& sin = a.tensor("sin");
  const at::Tensor& out = a.tensor("out");
  const std::optional<at::Tensor> seqlen_offsets = a.optional_tensor("seqlen_offsets");
  const std::optional<at::Tensor> cu_seqlens = a.optional_tensor("cu_seqlens");
  const int64_t seqlen_offset = a.integer("seqlen_offset"), max_seqlen = a.integer("max_seqlen");
  const bool interleaved = a.boolean("interleaved"), conjugate = a.boolean("conjugate");
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
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen <= INT_MAX, "max_seqlen must be in [0, 2^31 - 1], got ", max_seqlen);
  TORCH_CHECK(seqlen_offset >= 0 && seqlen_offset <= INT_MAX, "seqlen_offset must be in [0, 2^31 - 1], got ",
              seqlen_offset);
  TORCH_CHECK(cos.size(0) <= INT_MAX, "cos/sin have more than 2^31 - 1 rows");
  // torch's rules for a written tensor: no two elements at one address (an expanded out would be
  // rotated once per alias), no overlap with an input. out == x (in place) must be the same
  // view, since the kernel then skips the pass-through copy. (ATen's overlap test gives up on
  // strided views; the byte ranges below are conservative, which is all a kernel output needs.)
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "out has elements sharing one memory location (an expand()ed or stride-0 tensor, strides ",
              out.strides(), "); the rotation would be applied once per alias");
  if (out.data_ptr() == x.data_ptr()) {
    TORCH_CHECK(out.strides() == x.strides(), "out and x share a data pointer but not strides: in place, out must be x");
  } else {
    TORCH_CHECK(!bytes_overlap(out, x), "out overlaps x without being x (in place: pass out = x)");
  }
  TORCH_CHECK(!bytes_overlap(out, cos) && !bytes_overlap(out, sin), "out shares memory with cos or sin");

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
  if (x.is_cpu()) check_rotary_host(p, x.size(0));
  return p;
}

}  // namespace phi
