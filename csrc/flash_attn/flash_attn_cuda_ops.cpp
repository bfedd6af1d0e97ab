// Tensor glue of phi_kernels::flash_attn_forward_out / flash_attn_backward_out for the CUDA
// kernels (schemas in csrc/op_schemas.h): argument checks (make_params), the launch plan, the
// backward's workspaces (D = rowsum(dO * O), the fp32 dq accumulator) and the GQA reduction of
// dK, dV, then the launch.
//
// Compiled into phi_kernels._C for CUDA tensors (PHI_WITH_CUDA) and into phi_kernels._simt for
// CPU tensors (PHI_SIMT: the same code drives the same kernels in the SIMT emulator, the
// "cuda-emu" backend); bind_utils.h's PHI_GPU_* names are all that differs.
#if defined(PHI_WITH_CUDA) || defined(PHI_SIMT)
#include <torch/library.h>

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "common/cuda_runtime.cuh"
#include "flash_attn/flash_attn_bind.h"
#include "flash_attn/flash_launch.h"
#include "flash_attn/flash_plan.h"

namespace phi {
namespace {

// The plan's shared memory must fit the device: the sm_80 build also runs on sm_86 / sm_89
// parts, whose 99 KiB opt-in limit is below what some instantiations ask for.
void check_fits_device(const flash::Launch_plan& plan, bool backward) {
  TORCH_CHECK(plan.grid_x <= 2147483647 && plan.grid_y <= 65535, "flash attention (cuda backend): ",
              backward ? "key" : "query", " tiles x sequences (", plan.grid_x, ") or heads (", plan.grid_y,
              ") exceed a launch's grid (2^31 - 1, 65535)");
  const int limit = max_dynamic_smem_optin();
  TORCH_CHECK(plan.smem_bytes <= limit, "flash attention (cuda backend): the head_dim ", plan.head_dim, " ",
              backward ? "backward" : "forward", " needs ", plan.smem_bytes,
              " bytes of shared memory per block, this GPU allows ", limit);
}

template <bool kBackward>
void dispatch(const Flash_params& p, void* stream) {
  const bool fp16 = p.dtype == DType::kFloat16;
  if (p.head_dim == 64) {
    if constexpr (kBackward) {
      fp16 ? flash::run_flash_bwd<DType::kFloat16, 64>(p, stream) : flash::run_flash_bwd<DType::kBFloat16, 64>(p, stream);
    } else {
      fp16 ? flash::run_flash_fwd<DType::kFloat16, 64>(p, stream) : flash::run_flash_fwd<DType::kBFloat16, 64>(p, stream);
    }
  } else {
    if constexpr (kBackward) {
      fp16 ? flash::run_flash_bwd<DType::kFloat16, 128>(p, stream)
           : flash::run_flash_bwd<DType::kBFloat16, 128>(p, stream);
    } else {
      fp16 ? flash::run_flash_fwd<DType::kFloat16, 128>(p, stream)
           : flash::run_flash_fwd<DType::kBFloat16, 128>(p, stream);
    }
  }
}

void flash_attn_forward_gpu(const Op_args& a) {
  const at::Tensor& q = a.tensor("q");
  PHI_GPU_GUARD(q);
  Flash_params p = make_params(a);
  check_cuda_supported(p, {{"q", &q}, {"k", &a.tensor("k")}, {"v", &a.tensor("v")}, {"out", &a.tensor("out")}});
  if (p.batch == 0 || p.seqlen_q == 0 || p.heads == 0) return;
  check_fits_device(flash::plan_fwd(p), false);
  dispatch<false>(p, PHI_GPU_STREAM());
  PHI_GPU_LAUNCH_CHECK();
}

void flash_attn_backward_gpu(const Op_args& a) {
  const at::Tensor &dout = a.tensor("dout"), &q = a.tensor("q"), &k = a.tensor("k"), &v = a.tensor("v");
  const at::Tensor &out = a.tensor("out"), &dq = a.tensor("dq"), &dk = a.tensor("dk"), &dv = a.tensor("dv");
  PHI_GPU_GUARD(q);
  Flash_params p = make_params(a);
  check_cuda_supported(p, {{"q", &q}, {"k", &k}, {"v", &v}, {"dout", &dout}});
  check_like(dk, "dk", k, "k");
  check_like(dv, "dv", k, "k");
  if (p.batch == 0 || p.heads == 0 || p.seqlen_k == 0) return;
  if (p.seqlen_q == 0) {
    dk.zero_();
    dv.zero_();
    return;
  }
  check_fits_device(flash::plan_bwd(p), true);
  const bool varlen = p.is_varlen();
  // D = rowsum(dO * O) in lse's layout, and the fp32 dq accumulator the kernel adds into.
  at::Tensor d_rows = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  d_rows = (varlen ? d_rows.t() : d_rows.transpose(1, 2)).contiguous();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  // GQA: the kernel writes each query head's dK, dV into (.., heads, d) buffers; the group sum
  // happens here in fp32.
  const int64_t group = p.heads / p.kv_heads;
  at::Tensor dk_heads = dk, dv_heads = dv;
  if (group > 1) {
    std::vector<int64_t> shape(k.sizes().begin(), k.sizes().end());
    shape[shape.size() - 2] = p.heads;
    dk_heads = at::empty(shape, k.options());
    dv_heads = at::empty(shape, k.options());
  }
  add_backward(p, dout, q, dk_heads, dq, dk_heads, dv_heads);
  p.dq_accum = device_ptr<float>(dq_accum, "dq_accum");
  p.d_rows = device_ptr<float>(d_rows, "d_rows");
  dispatch<true>(p, PHI_GPU_STREAM());
  PHI_GPU_LAUNCH_CHECK();
  dq.copy_(dq_accum);
  if (group > 1) {
    auto grouped = [&](const at::Tensor& t) {  // (.., heads, d) -> (.., kv_heads, group, d) -> sum
      std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
      shape[shape.size() - 2] = group;
      shape.insert(shape.end() - 2, p.kv_heads);
      return t.view(shape).to(at::kFloat).sum(-2);
    };
    dk.copy_(grouped(dk_heads));
    dv.copy_(grouped(dv_heads));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(PHI_GPU_LIBRARY, PHI_GPU_DISPATCH_KEY, m) {
  m.impl("flash_attn_forward_out", out_op<&flash_attn_forward_gpu>());
  m.impl("flash_attn_backward_out", out_op<&flash_attn_backward_gpu>());
}

}  // namespace phi
#endif
