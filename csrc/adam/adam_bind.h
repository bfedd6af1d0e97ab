// Argument checks and tensor-list gathering shared by the CPU glue (adam_ops.cpp) and the CUDA
// glue (adam_cuda_ops.cpp, also compiled into the SIMT emulator).
#pragma once
#include <ATen/core/TensorBody.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "adam/adam_launch.h"
#include "common/bind_utils.h"

namespace phi {

struct Lists {
  std::vector<void*> params;
  std::vector<const void*> grads;
  std::vector<float*> m, v, vmax, master;
  std::vector<int64_t> numels;
  Adam_tensor_lists view{};
};

inline void check_list(const at::TensorList& list, const at::TensorList& params, const char* name, bool fp32) {
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

inline Lists make_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
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
    l.params.push_back(device_ptr(params[i], "params"));
    l.grads.push_back(device_ptr(grads[i], "grads"));
    l.m.push_back(device_ptr<float>(exp_avgs[i], "exp_avgs"));
    l.v.push_back(device_ptr<float>(exp_avg_sqs[i], "exp_avg_sqs"));
    if (!max_exp_avg_sqs.empty()) l.vmax.push_back(device_ptr<float>(max_exp_avg_sqs[i], "max_exp_avg_sqs"));
    if (!masters.empty()) l.master.push_back(device_ptr<float>(masters[i], "masters"));
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

inline void check_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, name, " must be a one-element float32 tensor, got ",
              t.scalar_type(), t.sizes());
}

inline Adam_hparams make_hparams(double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode,
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

inline Adam_call prepare(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
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

}  // namespace phi
