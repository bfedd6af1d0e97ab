// Entry points of the Adam kernels, called by the bindings in adam_ops.cpp.
#pragma once
#include "adam/adam.h"

namespace phi {

void adam_cpu(const Adam_tensor_lists& lists, const Adam_hparams& h);

// Device scalars (nullptr when absent): lr and step override h.lr / h.step (capturable),
// grad_scale overrides h.inv_grad_scale (divides), found_inf > 0 skips the whole update.
struct Adam_device_scalars {
  const float* lr;
  const float* step;
  const float* grad_scale;
  const float* found_inf;
};
// CUDA kernels (adam_cuda.cu; also built into the SIMT emulator). `stream` is a cudaStream_t.
// The pointer arrays in `lists` live on the host.
void adam_cuda(const Adam_tensor_lists& lists, const Adam_hparams& h, const Adam_device_scalars& s, void* stream);

}  // namespace phi
