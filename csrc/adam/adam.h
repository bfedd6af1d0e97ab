// Adam / AdamW update: the math shared by the CPU kernel (adam_cpu.cpp), the CUDA kernel
// (adam_cuda.cu) and the host test (csrc/tests/adam_math_test.cpp).
//
// One element, fp32 math, torch.optim semantics:
//   g = grad / grad_scale                (grad_scale = 1 without mixed precision)
//   g = -g                               if maximize
//   p = p * (1 - lr * wd)                if adam_w_mode (decoupled, AdamW)
//   g = g + wd * p                       otherwise (L2, Adam)
//   m = m + (1 - b1) * (g - m)           (torch's lerp)
//   v = b2 * v + (1 - b2) * g * g
//   vmax = max(vmax, v); use vmax for v  if amsgrad
//   p = p - (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps)),   bc_i = 1 - b_i^step (1 when off)
// Storage: p in fp32/fp16/bf16 (or an fp32 master copy written back to p), m/v/vmax fp32.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace phi {

struct Adam_hparams {
  float lr;
  float beta1, beta2, eps, weight_decay;
  float step;  // this step's count (already incremented)
  float inv_grad_scale;
  bool adam_w_mode, bias_correction, amsgrad, maximize;
};

// Per-step scalars derived once per launch (or once per thread on the device).
// The flags become coefficients so the per-element update has no branches (and vectorizes):
// multiplying by 1 or -1 and adding 0 * p are exact, so results equal the branchy form.
struct Adam_coeffs {
  float step_size;  // lr / bc1
  float bc2_sqrt;   // sqrt(bc2)
  float decay;      // 1 - lr * wd (AdamW) or 1 (Adam)
  float l2;         // wd (Adam) or 0 (AdamW)
  float grad_mul;   // 1 / grad_scale, negated when maximizing
};

// In double, rounded once, as torch.optim does with Python floats: beta2^step for step ~1e5
// loses digits in fp32.
PHI_HOST_DEVICE Adam_coeffs adam_coeffs(const Adam_hparams& h) {
  double bc1 = 1.0, bc2 = 1.0;
  if (h.bias_correction) {
    bc1 = 1.0 - pow(double(h.beta1), double(h.step));
    bc2 = 1.0 - pow(double(h.beta2), double(h.step));
  }
  Adam_coeffs c;
  c.step_size = float(double(h.lr) / bc1);
  c.bc2_sqrt = float(sqrt(bc2));
  c.decay = h.adam_w_mode ? float(1.0 - double(h.lr) * double(h.weight_decay)) : 1.f;
  c.l2 = h.adam_w_mode ? 0.f : h.weight_decay;
  c.grad_mul = h.maximize ? -h.inv_grad_scale : h.inv_grad_scale;
  return c;
}

// Updates one element in place. `vmax` is read/written only when kAmsgrad.
template <bool kAmsgrad>
PHI_HOST_DEVICE void adam_update(float& p, float g, float& m, float& v, float& vmax, const Adam_hparams& h,
                                 const Adam_coeffs& c) {
  g *= c.grad_mul;
  p *= c.decay;   // AdamW's decoupled decay
  g += c.l2 * p;  // Adam's L2 term
  m += (1.f - h.beta1) * (g - m);
  v = h.beta2 * v + (1.f - h.beta2) * g * g;
  float vv = v;
  if (kAmsgrad) {
    vmax = vmax > v ? vmax : v;
    vv = vmax;
  }
  const float denom = sqrtf(vv) / c.bc2_sqrt + h.eps;
  p -= c.step_size * (m / denom);
}

// What a kernel launch sees: one list of tensors of one param dtype. Pointers are raw.
struct Adam_tensor_lists {
  int n_tensors;
  void* const* params;        // param dtype
  const void* const* grads;   // param dtype
  float* const* exp_avgs;
  float* const* exp_avg_sqs;
  float* const* max_exp_avg_sqs;  // nullptr entries / array when !amsgrad
  float* const* masters;          // nullptr array when no master weights
  const int64_t* numels;
  DType dtype;
};

}  // namespace phi
