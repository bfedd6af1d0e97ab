// Tensor glue of phi_kernels::adam_step_out for CPU tensors (schema in csrc/op_schemas.h): checks the
// tensor lists, gathers raw pointers and sizes, and runs the CPU kernel. The CUDA side is
// adam_cuda_ops.cpp.
// All tensors of one call share the param dtype and device (the Python optimizer groups them).
#include <torch/library.h>

#include <vector>

#include "adam/adam_bind.h"

namespace phi {
namespace {

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList masters, const at::Tensor& lr, const at::Tensor& step,
                   double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode, bool bias_correction,
                   bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  Adam_call c = prepare(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, step, beta1, beta2, eps,
                        weight_decay, adam_w_mode, bias_correction, maximize, grad_scale, found_inf);
  if (found_inf.has_value() && found_inf->item<float>() > 0.f) return;
  if (grad_scale.has_value()) c.h.inv_grad_scale = 1.f / grad_scale->item<float>();
  c.h.lr = lr.item<float>();
  c.h.step = step.item<float>();
  adam_cpu(c.lists.view, c.h);
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) { m.impl("adam_step_out", &adam_step_cpu); }

}  // namespace phi
