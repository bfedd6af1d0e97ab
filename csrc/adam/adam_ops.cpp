// Tensor glue of phi_kernels::adam_step (schema in csrc/ops.cpp): checks the tensor lists,
// gathers raw pointers and sizes, and runs the CPU or the CUDA multi-tensor kernel.
// All tensors of one call share the param dtype and device (the Python optimizer groups them).
#include <torch/library.h>

#include <vector>

#include "adam/adam_launch.h"
#include "common/bind_utils.h"

namespace phi {
namespace {

struct Lists {
  std::vector<void*> params;
  std::vector<const void*> grads;
  std::vector<float*> m, v, vmax, master;
  std::vector<int64_t> numels;
  Adam_tensor_lists view{};
};

void check_list(const at::TensorList& list, const at::TensorList& params, const char* name, bool fp32) {
  TORCH_CHECK(list.size() == params.size(), name, " must have one tensor per param (", params.size(), "), got ",
              list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].numel() == params[i].numel() && list[i].is_contiguous(), name, "[", i,
                "] must be contiguous with the param's ", params[i].numel(), " elements");
    TORCH_CHECK(list[i].device() == params[i].device(), name, "[", i, "] must be on ", params[i].device());
    if (fp32) {
      TORCH_CHECK(list[i].scalar_type() == at::kFloat, name, "[", i, "] must be float32, got ", list[i].scalar_type());
    } else {
      TORCH_CHECK(list[i].scalar_type() == params[i].scalar_type(), name, "[", i, "] must have the param's dtype");
    }
  }
}

Lists make_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList masters) {
  TORCH_CHECK(!params.empty(), "params must not be empty");
  const auto dtype = params[0].scalar_type();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == dtype && params[i].device() == params[0].device(),
                "every param of one call must share dtype and device");
    TORCH_CHECK(params[i].is_contiguous(), "params[", i, "] must be contiguous");
  }
  check_list(grads, params, "grads", false);
  check_list(exp_avgs, params, "exp_avgs", true);
  check_list(exp_avg_sqs, params, "exp_avg_sqs", true);
  if (!max_exp_avg_sqs.empty()) check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", true);
  if (!masters.empty()) {
    check_list(masters, params, "masters", true);
    TORCH_CHECK(dtype != at::kFloat, "master weights are for float16/bfloat16 params");
  }
  Lists l;
  for (size_t i = 0; i < params.size(); ++i) {
    l.params.push_back(params[i].data_ptr());
    l.grads.push_back(grads[i].data_ptr());
    l.m.push_back(exp_avgs[i].data_ptr<float>());
    l.v.push_back(exp_avg_sqs[i].data_ptr<float>());
    if (!max_exp_avg_sqs.empty()) l.vmax.push_back(max_exp_avg_sqs[i].data_ptr<float>());
    if (!masters.empty()) l.master.push_back(masters[i].data_ptr<float>());
    l.numels.push_back(params[i].numel());
  }
  l.view.n_tensors = int(params.size());
  l.view.params = l.params.data();
  l.view.grads = l.grads.data();
  l.view.exp_avgs = l.m.data();
  l.view.exp_avg_sqs = l.v.data();
  l.view.max_exp_avg_sqs = l.vmax.empty() ? nullptr : l.vmax.data();
  l.view.masters = l.master.empty() ? nullptr : l.master.data();
  l.view.numels = l.numels.data();
  l.view.dtype = to_phi_dtype(params[0], "params");
  return l;
}

void check_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, name, " must be a one-element float32 tensor, got ",
              t.scalar_type(), t.sizes());
}

Adam_hparams make_hparams(double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode,
                          bool bias_correction, bool amsgrad, bool maximize) {
  Adam_hparams h{};
  h.beta1 = float(beta1);
  h.beta2 = float(beta2);
  h.eps = float(eps);
  h.weight_decay = float(weight_decay);
  h.adam_w_mode = adam_w_mode;
  h.bias_correction = bias_correction;
  h.amsgrad = amsgrad;
  h.maximize = maximize;
  h.inv_grad_scale = 1.f;
  return h;
}

// What both implementations need: checked tensor lists, the hyperparameters, checked scalars.
struct Adam_call {
  Lists lists;
  Adam_hparams h;
};

Adam_call prepare(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, at::TensorList masters, const at::Tensor& lr, const at::Tensor& step,
                  double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode, bool bias_correction,
                  bool maximize, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  check_scalar(lr, "lr");
  check_scalar(step, "step");
  if (grad_scale.has_value()) check_scalar(*grad_scale, "grad_scale");
  if (found_inf.has_value()) check_scalar(*found_inf, "found_inf");
  return {make_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters),
          make_hparams(beta1, beta2, eps, weight_decay, adam_w_mode, bias_correction, !max_exp_avg_sqs.empty(),
                       maximize)};
}

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

#ifdef PHI_WITH_CUDA
// Device scalars stay on the device (no sync); host scalars are read on the host.
const float* device_or_host(const at::Tensor& t, float& host_value) {
  if (t.is_cuda()) return t.data_ptr<float>();
  host_value = t.item<float>();
  return nullptr;
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList masters, const at::Tensor& lr, const at::Tensor& step,
                    double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode, bool bias_correction,
                    bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  Adam_call c = prepare(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, step, beta1, beta2, eps,
                        weight_decay, adam_w_mode, bias_correction, maximize, grad_scale, found_inf);
  Adam_device_scalars s{};
  s.lr = device_or_host(lr, c.h.lr);
  s.step = device_or_host(step, c.h.step);
  if (grad_scale.has_value()) {
    float scale = 1.f;
    s.grad_scale = device_or_host(*grad_scale, scale);
    c.h.inv_grad_scale = 1.f / scale;
  }
  if (found_inf.has_value()) {
    float flag = 0.f;
    s.found_inf = device_or_host(*found_inf, flag);
    if (flag > 0.f) return;
  }
  c10::cuda::CUDAGuard guard(params[0].device());
  adam_cuda(c.lists.view, c.h, s, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) { m.impl("adam_step", &adam_step_cpu); }

#ifdef PHI_WITH_CUDA
TORCH_LIBRARY_IMPL(phi_kernels, CUDA, m) { m.impl("adam_step", &adam_step_cuda); }
#endif

}  // namespace phi
