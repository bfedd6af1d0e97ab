// Tensor glue of phi_kernels::rotary_kernel for the CUDA kernel (schema in csrc/ops.cpp).
// Compiled into phi_kernels._C for CUDA tensors (PHI_WITH_CUDA) and into phi_kernels._simt for
// CPU tensors (PHI_SIMT, the "cuda-emu" backend); bind_utils.h's PHI_GPU_* names differ.
#if defined(PHI_WITH_CUDA) || defined(PHI_SIMT)
#include <torch/library.h>

#include "rotary/rotary_bind.h"
#include "rotary/rotary_launch.h"

namespace phi {
namespace {

void rotary_kernel_gpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset,
                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, bool interleaved,
                       bool conjugate, const at::Tensor& out) {
  PHI_GPU_GUARD(x);
  Rotary_params p = make_rotary_params(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen,
                                       interleaved, conjugate, out);
  if (p.batch == 0 || p.seqlen == 0) return;
  rotary_cuda(p, PHI_GPU_STREAM());
  PHI_GPU_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(PHI_GPU_LIBRARY, PHI_GPU_DISPATCH_KEY, m) { m.impl("rotary_kernel", &rotary_kernel_gpu); }

}  // namespace phi
#endif
