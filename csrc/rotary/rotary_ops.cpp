// Tensor glue of phi_kernels::rotary_kernel for CPU tensors (schema in csrc/ops.cpp): checks
// what the kernel relies on (the Python API has already given friendlier errors), fills
// Rotary_params and runs the CPU kernel. The CUDA side is rotary_cuda_ops.cpp.
#include <torch/library.h>

#include "rotary/rotary_bind.h"
#include "rotary/rotary_launch.h"

namespace phi {
namespace {

// The CPU kernel checks the rows and positions it will touch (cheap on the host); the CUDA path
// relies on the Python API, which checks them before launching.
void check_positions_cpu(const Rotary_params& p, int64_t rows) {
  for (int b = 0; b < p.batch; ++b) {
    int64_t start;
    int len;
    rotary_seq_bounds(p, b, start, len);
    TORCH_CHECK(len >= 0 && len <= p.seqlen, "cu_seqlens must be non-decreasing with lengths <= max_seqlen");
    TORCH_CHECK(!p.is_varlen || (start >= 0 && start + len <= rows), "cu_seqlens must stay within the ", rows,
                " rows of x, sequence ", b, " covers rows [", start, ", ", start + len, ")");
    const int64_t off = rotary_offset(p, b);
    TORCH_CHECK(off >= 0 && (len == 0 || off + len <= p.seqlen_ro), "sequence ", b, " needs cos/sin rows up to ",
                off + len, " but cos has ", p.seqlen_ro);
  }
}

void rotary_kernel_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset,
                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, bool interleaved,
                       bool conjugate, const at::Tensor& out) {
  Rotary_params p = make_rotary_params(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen,
                                       interleaved, conjugate, out);
  check_positions_cpu(p, x.size(0));
  rotary_cpu(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) { m.impl("rotary_kernel", &rotary_kernel_cpu); }

}  // namespace phi
