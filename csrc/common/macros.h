// Shared macros for code compiled both by nvcc (device) and by the host C++ compiler.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PHI_HOST_DEVICE __host__ __device__ __forceinline__
#define PHI_DEVICE __device__ __forceinline__
#else
#define PHI_HOST_DEVICE inline
#define PHI_DEVICE inline
#endif

namespace phi {

// Scalar types the kernels are instantiated for. The ids match the order used by the
// bindings (csrc/common/dispatch.h); kernels never see at::ScalarType.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace phi
