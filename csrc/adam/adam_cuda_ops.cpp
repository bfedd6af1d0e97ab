// Tensor glue of phi_kernels::adam_step_out for the CUDA multi-tensor kernel (schema in
// csrc/op_schemas.h). Compiled into phi_kernels._C for CUDA tensors (PHI_WITH_CUDA) and into
// phi_kernels._simt for CPU tensors (PHI_SIMT, the "cuda-emu" backend); bind_utils.h's PHI_GPU_*
// names differ.
#if defined(PHI_WITH_CUDA) || defined(PHI_SIMT)
#include <torch/library.h>

#include "adam/adam_bind.h"

namespace phi {
namespace {

// Scalars on the kernels' device stay there (read by the kernel: no host sync, capturable);
// others are read on the host.
const float* device_or_host(const at::Tensor& t, float& host_value, const char* name) {
  if (on_gpu(t)) return device_ptr<float>(t, name);
  host_value = t.item<float>();
  return nullptr;
}

void adam_step_gpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList masters, const at::Tensor& lr, const at::Tensor& step,
                   double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode, bool bias_correction,
                   bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  PHI_GPU_GUARD(params[0]);
  Adam_call c = prepare(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, step, beta1, beta2, eps,
                        weight_decay, adam_w_mode, bias_correction, maximize, grad_scale, found_inf);
  Adam_device_scalars s{};
  s.lr = device_or_host(lr, c.h.lr, "lr");
  s.step = device_or_host(step, c.h.step, "step");
  if (grad_scale.has_value()) {
    float scale = 1.f;
    s.grad_scale = device_or_host(*grad_scale, scale, "grad_scale");
    c.h.inv_grad_scale = 1.f / scale;
  }
  if (found_inf.has_value()) {
    float flag = 0.f;
    s.found_inf = device_or_host(*found_inf, flag, "found_inf");
    if (flag > 0.f) return;
  }
  adam_cuda(c.lists.view, c.h, s, PHI_GPU_STREAM());
  PHI_GPU_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(PHI_GPU_LIBRARY, PHI_GPU_DISPATCH_KEY, m) { m.impl("adam_step_out", &adam_step_gpu); }

}  // namespace phi
#endif
