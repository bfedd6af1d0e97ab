// Tensor glue of phi_kernels::rotary_out for CPU tensors (schema in csrc/op_schemas.h): checks
// what the kernel relies on (the Python API has already given friendlier errors; the bounds of
// cu_seqlens, seqlen_offsets and cos/sin are checked on the host in make_rotary_params), fills
// Rotary_params and runs the CPU kernel. The CUDA side is rotary_cuda_ops.cpp.
#include <torch/library.h>

#include "rotary/rotary_bind.h"
#include "rotary/rotary_launch.h"

namespace phi {
namespace {

void rotary_out_cpu(const Op_args& a) {
  Rotary_params p = make_rotary_params(a);
  rotary_cpu(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) { m.impl("rotary_out", out_op<&rotary_out_cpu>()); }

}  // namespace phi
