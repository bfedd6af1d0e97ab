// Tensor glue of phi_kernels::flash_attn_fwd / flash_attn_bwd for CPU tensors and of the
// flash_attn_cuda_plan op (schemas in csrc/ops.cpp): checks what the CPU kernels rely on (the
// Python API, phi_kernels/flash_attn.py, has already given friendlier errors), fills
// Flash_params and runs them. The CUDA side is flash_attn_cuda_ops.cpp.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "flash_attn/flash_attn_bind.h"
#include "flash_attn/flash_launch.h"
#include "flash_attn/flash_plan.h"

namespace phi {
namespace {

// On the CPU the kernels index keys through seqused_k directly: its values must fit (the CUDA
// path relies on phi_kernels.flash_attn_with_kvcache's checks instead of a device sync).
void check_seqused_k_cpu(const Flash_params& p) {
  if (p.seqused_k == nullptr) return;
  for (int b = 0; b < p.batch; ++b) {
    const int64_t avail = p.is_varlen() ? int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b] : p.seqlen_k;
    TORCH_CHECK(p.seqused_k[b] >= 0 && p.seqused_k[b] <= avail, "seqused_k[", b, "] = ", p.seqused_k[b],
                " must be in [0, ", avail, "] (the keys sequence ", b, " has)");
  }
}

// The CPU kernels size their buffers by max_seqlen and index rows through cu_seqlens, so a
// bad cu_seqlens must not reach them (cheap to check on the host).
void check_cu_seqlens_cpu(const Flash_params& p, int64_t total_k) {
  if (!p.is_varlen()) return;
  const int32_t* cq = p.cu_seqlens_q;
  const int32_t* ck = p.cu_seqlens_k;
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0, "cu_seqlens must start at 0");
  for (int b = 0; b < p.batch; ++b) {
    const int64_t lq = int64_t(cq[b + 1]) - cq[b], lk = int64_t(ck[b + 1]) - ck[b];
    TORCH_CHECK(lq >= 0 && lq <= p.seqlen_q, "cu_seqlens_q must be non-decreasing with lengths <= max_seqlen_q (",
                p.seqlen_q, "), sequence ", b, " has ", lq);
    TORCH_CHECK(lk >= 0 && lk <= p.seqlen_k, "cu_seqlens_k must be non-decreasing with lengths <= max_seqlen_k (",
                p.seqlen_k, "), sequence ", b, " has ", lk);
  }
  TORCH_CHECK(cq[p.batch] == p.total_q && ck[p.batch] == total_k,
              "cu_seqlens must end at the packed lengths of q and k");
}

void flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                        const std::optional<at::Tensor>& seqused_k, int64_t max_q,
                        int64_t max_k, double scale, int64_t window_left, int64_t window_right, double softcap,
                        double dropout_p, int64_t seed, const at::Tensor& out, const at::Tensor& lse) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  check_cu_seqlens_cpu(p, k.size(0));
  add_seqused_k(p, seqused_k, q);
  check_seqused_k_cpu(p);
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
  check_cu_seqlens_cpu(p, k.size(0));
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
