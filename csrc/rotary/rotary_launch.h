// Entry points of the rotary kernels, called by the bindings in rotary_ops.cpp.
#pragma once
#include "rotary/rotary.h"

namespace phi {

void rotary_cpu(const Rotary_params& params);

// CUDA kernel (rotary_cuda.cu; also built into the SIMT emulator). `stream` is a cudaStream_t,
// kept as void* so this header needs no CUDA headers.
void rotary_cuda(const Rotary_params& params, void* stream);

}  // namespace phi
