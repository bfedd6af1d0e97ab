// Shared macros for code compiled both by nvcc (device) and by the host C++ compiler.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PHI_HOST_DEVICE __host__ __device__ __forceinline__
#define PHI_DEVICE __device__ __forceinline__
#else
#define PHI_HOST_DEVICE inline
#define PHI_DEVICE inline
#endif

// PHI_LDG(ptr): a load from global memory in code shared by the CPU and CUDA kernels (the
// params structs' cu_seqlens / offsets arrays). A plain dereference, except in the SIMT emulator
// build, where every global access is checked against the tensors of the launch.
#ifdef PHI_SIMT
namespace phi::simt {
const void* checked_global(const void* p, unsigned long bytes, bool write);
}
#define PHI_LDG(ptr) (*static_cast<decltype(ptr)>(::phi::simt::checked_global((ptr), sizeof(*(ptr)), false)))
#else
#define PHI_LDG(ptr) (*(ptr))
#endif

namespace phi {

// Scalar types the kernels are instantiated for. The ids match the order used by the
// bindings (csrc/common/dispatch.h); kernels never see at::ScalarType.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace phi
