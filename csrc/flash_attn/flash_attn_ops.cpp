// Tensor glue of phi_kernels::flash_attn_forward_out / flash_attn_backward_out for CPU tensors
// and of the flash_attn_cuda_plan op (schemas in csrc/op_schemas.h, csrc/ops.cpp): make_params
// (flash_attn_bind.h) checks what the CPU kernels rely on (the Python API,
// phi_kernels/flash_attn.py, has already given friendlier errors; cu_seqlens and seqused_k are
// checked on the host) and fills Flash_params, then the kernels run.
// The CUDA side is flash_attn_cuda_ops.cpp.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <algorithm>

#include "flash_attn/flash_attn_bind.h"
#include "flash_attn/flash_launch.h"
#include "flash_attn/flash_plan.h"

namespace phi {
namespace {

// The CPU kernels size their buffers by seqlen_q / seqlen_k: with cu_seqlens (checked on the
// host by make_params) they become the longest sequences, so a max_seqlen far above them
// (flash-attention accepts any max_seqlen >= the longest) allocates nothing more.
void size_by_longest_sequences(Flash_params& p) {
  if (!p.is_varlen()) return;
  int longest_q = 0, longest_k = 0;
  for (int b = 0; b < p.batch; ++b) {
    longest_q = std::max(longest_q, p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]);
    longest_k = std::max(longest_k, p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]);
  }
  p.seqlen_q = longest_q;
  p.seqlen_k = longest_k;
}

void flash_attn_forward_cpu(const Op_args& a) {
  Flash_params p = make_params(a);
  size_by_longest_sequences(p);
  flash_fwd_cpu(p);
}

void flash_attn_backward_cpu(const Op_args& a) {
  Flash_params p = make_params(a);
  add_backward(p, a.tensor("dout"), a.tensor("q"), a.tensor("k"), a.tensor("dq"), a.tensor("dk"), a.tensor("dv"));
  size_by_longest_sequences(p);
  flash_bwd_cpu(p);
}

// ----------------------------------------------------------------------------- CUDA plan
//
// Everything up to the kernel launch is plain C++ over Flash_params (flash_plan.h), so the
// CPU tests run it through flash_attn_cuda_plan below.

// (head_dim, grid x, y, z, threads, shared memory bytes) the CUDA kernels would launch with.
std::vector<int64_t> flash_attn_cuda_plan(const Op_args& a) {
  const Flash_params p = make_params(a);
  check_cuda_supported(p, {{"q", &a.tensor("q")}, {"k", &a.tensor("k")}, {"v", &a.tensor("v")}});
  const flash::Launch_plan plan = a.boolean("backward") ? flash::plan_bwd(p) : flash::plan_fwd(p);
  return {plan.head_dim, plan.grid_x, plan.grid_y, plan.grid_z, plan.threads, plan.smem_bytes};
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) {
  m.impl("flash_attn_forward_out", out_op<&flash_attn_forward_cpu>());
  m.impl("flash_attn_backward_out", out_op<&flash_attn_backward_cpu>());
}

TORCH_LIBRARY_IMPL(phi_kernels, CompositeExplicitAutograd, m) {
  m.impl("flash_attn_cuda_plan", int_list_op<&flash_attn_cuda_plan>());
}

}  // namespace phi
