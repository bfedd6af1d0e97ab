// Helpers for the tensor glue files (csrc/<op>/<op>_ops.cpp, <op>_cuda_ops.cpp). Kernels never
// see at::Tensor: the glue checks tensors, fills a params struct of pointers and strides, and
// launches.
//
// The CUDA glue (<op>_cuda_ops.cpp) is compiled twice: into phi_kernels._C for CUDA tensors
// (PHI_WITH_CUDA), and into phi_kernels._simt for CPU tensors (PHI_SIMT), where the same host
// code drives the same kernels in the SIMT emulator. The PHI_GPU_* names below are the only
// things that differ: the op library and dispatch key, the device guard, the stream, the
// launch check, and device_ptr, which under the emulator also tells it which memory the
// kernels may touch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/macros.h"

#if defined(PHI_SIMT)
#include "simt/simt.h"
#elif defined(PHI_WITH_CUDA)
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

// Bytes from t's first to one past its last element (strides >= 0).
inline size_t span_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return size_t(last + 1) * t.element_size();
}

// Whether a and b share storage and their byte ranges [first element, last element] meet (what
// an out-variant op refuses between what it writes and what it reads).
inline bool bytes_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  const char* a0 = static_cast<const char*>(a.data_ptr());
  const char* b0 = static_cast<const char*>(b.data_ptr());
  return a0 < b0 + span_bytes(b) && b0 < a0 + span_bytes(a);
}

// The data pointer a kernel receives for `t` (named for the emulator's messages).
inline void* device_ptr(const at::Tensor& t, const char* name) {
#ifdef PHI_SIMT
  simt::register_region(t.data_ptr(), span_bytes(t), name);
#else
  (void)name;
#endif
  return t.data_ptr();
}
template <typename T>
inline T* device_ptr(const at::Tensor& t, const char* name) {
  return static_cast<T*>(device_ptr(t, name));
}

#define PHI_CHECK_DEVICE(t, ref) \
  TORCH_CHECK((t).device() == (ref).device(), #t " must be on ", (ref).device(), ", got ", (t).device())
#define PHI_CHECK_SHAPE(t, ...) \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape (" #__VA_ARGS__ "), got ", (t).sizes())

#if defined(PHI_SIMT)
#define PHI_GPU_LIBRARY phi_kernels_emu
#define PHI_GPU_DISPATCH_KEY CPU
// Opens the set of tensors the launches of this call may touch.
#define PHI_GPU_GUARD(t) ::phi::simt::Memory_scope phi_gpu_scope_
#define PHI_GPU_STREAM() static_cast<void*>(nullptr)
#define PHI_GPU_LAUNCH_CHECK() ((void)0)  // the emulator throws from the launch itself
// Whether a scalar tensor lives on the kernels' device (then it is read there, without a sync).
inline bool on_gpu(const at::Tensor& t) { return t.is_cpu(); }
#elif defined(PHI_WITH_CUDA)
#define PHI_GPU_LIBRARY phi_kernels
#define PHI_GPU_DISPATCH_KEY CUDA
#define PHI_GPU_GUARD(t) c10::cuda::CUDAGuard phi_gpu_guard_((t).device())
#define PHI_GPU_STREAM() static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream())
#define PHI_GPU_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
inline bool on_gpu(const at::Tensor& t) { return t.is_cuda(); }
#endif

}  // namespace phi
