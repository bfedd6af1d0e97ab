// Helpers for the tensor glue files (csrc/<op>/<op>_ops.cpp). Kernels never see at::Tensor:
// the glue checks tensors, fills a params struct of pointers and strides, and launches.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/macros.h"

#ifdef PHI_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace phi {

inline DType to_phi_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

#define PHI_CHECK_DEVICE(t, ref) \
  TORCH_CHECK((t).device() == (ref).device(), #t " must be on ", (ref).device(), ", got ", (t).device())
#define PHI_CHECK_SHAPE(t, ...) \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape (" #__VA_ARGS__ "), got ", (t).sizes())

}  // namespace phi
