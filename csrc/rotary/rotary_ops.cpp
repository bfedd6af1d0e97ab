// Tensor glue of phi_kernels::rotary_kernel for CPU tensors (schema in csrc/ops.cpp): checks
// what the kernel relies on (the Python API has already given friendlier errors; the bounds of
// cu_seqlens, seqlen_offsets and cos/sin are checked on the host in make_rotary_params), fills
// Rotary_params and runs the CPU kernel. The CUDA side is rotary_cuda_ops.cpp.
#include <torch/library.h>

#include "rotary/rotary_bind.h"
#include "rotary/rotary_launch.h"

namespace phi {
namespace {

void rotary_kernel_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset,
                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, bool interleaved,
                       bool conjugate, const at::Tensor& out) {
  Rotary_params p = make_rotary_params(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen,
                                       interleaved, conjugate, out);
  rotary_cpu(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) { m.impl("rotary_kernel", &rotary_kernel_cpu); }

}  // namespace phi
