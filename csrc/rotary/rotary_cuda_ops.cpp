// Tensor glue of phi_kernels::rotary_out for the CUDA kernel (schema in csrc/op_schemas.h).
// Compiled into phi_kernels._C for CUDA tensors (PHI_WITH_CUDA) and into phi_kernels._simt for
// CPU tensors (PHI_SIMT, the "cuda-emu" backend); bind_utils.h's PHI_GPU_* names differ.
#if defined(PHI_WITH_CUDA) || defined(PHI_SIMT)
#include <torch/library.h>

#include "rotary/rotary_bind.h"
#include "rotary/rotary_launch.h"

namespace phi {
namespace {

void rotary_out_gpu(const Op_args& a) {
  PHI_GPU_GUARD(a.tensor("x"));
  Rotary_params p = make_rotary_params(a);
  if (p.batch == 0 || p.seqlen == 0) return;
  rotary_cuda(p, PHI_GPU_STREAM());
  PHI_GPU_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(PHI_GPU_LIBRARY, PHI_GPU_DISPATCH_KEY, m) { m.impl("rotary_out", out_op<&rotary_out_gpu>()); }

}  // namespace phi
#endif
