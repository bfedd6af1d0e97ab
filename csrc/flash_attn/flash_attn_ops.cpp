// Tensor glue of phi_kernels::flash_attn_fwd / flash_attn_bwd for CPU tensors and of the
// flash_attn_cuda_plan op (schemas in csrc/ops.cpp): checks what the CPU kernels rely on (the
// Python API, phi_kernels/flash_attn.py, has already given friendlier errors; cu_seqlens and
// seqused_k are checked on the host in flash_attn_bind.h), fills Flash_params and runs them.
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

void flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                        const std::optional<at::Tensor>& seqused_k, int64_t max_q,
                        int64_t max_k, double scale, int64_t window_left, int64_t window_right, double softcap,
                        double dropout_p, int64_t seed, const at::Tensor& out, const at::Tensor& lse) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  size_by_longest_sequences(p);
  add_seqused_k(p, seqused_k, q);
  flash_fwd_cpu(p);
}

void flash_attn_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_q,
                        const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale,
                        int64_t window_left, int64_t window_right, double softcap, double dropout_p, int64_t seed,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  add_backward(p, dout, q, k, dq, dk, dv);
  size_by_longest_sequences(p);
  flash_bwd_cpu(p);
}

// ----------------------------------------------------------------------------- CUDA plan
//
// Everything up to the kernel launch is plain C++ over Flash_params (flash_plan.h), so the
// CPU tests run it through flash_attn_cuda_plan below.

// (head_dim, grid x, y, z, threads, shared memory bytes) the CUDA kernels would launch with.
std::vector<int64_t> flash_attn_cuda_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                                          int64_t max_q, int64_t max_k, const at::Tensor& out, const at::Tensor& lse,
                                          bool backward) {
  const Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, 1.0, -1, -1, 0.0, 0.0, 0, out, lse);
  check_cuda_supported(p, {{"q", &q}, {"k", &k}, {"v", &v}});
  const flash::Launch_plan plan = backward ? flash::plan_bwd(p) : flash::plan_fwd(p);
  return {plan.head_dim, plan.grid_x, plan.grid_y, plan.grid_z, plan.threads, plan.smem_bytes};
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
}

TORCH_LIBRARY_IMPL(phi_kernels, CompositeExplicitAutograd, m) { m.impl("flash_attn_cuda_plan", &flash_attn_cuda_plan); }

}  // namespace phi
