// The CUDA runtime API the launchers use (cudaStream_t, dim3, cudaFuncSetAttribute, device
// attributes), and `launch_kernel`, the one place a kernel is launched: `<<<>>>` under nvcc,
// the SIMT emulator (csrc/simt) when the launchers are compiled as host C++ (PHI_SIMT).
#pragma once
#include <stdexcept>
#include <string>

#ifdef PHI_SIMT
#include "simt/simt.h"
#else
#include <cuda_runtime.h>

namespace phi {

#ifdef __CUDACC__
// Launches `kernel` on `grid` x `block` threads with `smem` bytes of dynamic shared memory.
// `name` is for the emulator's error messages.
template <typename... Params, typename... Args>
inline void launch_kernel(const char* /*name*/, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<Args&&>(args)...);
}
#endif

// The runtime calls of the launchers, called qualified (rt::...) so that the emulator can
// provide its own without meeting libcudart's declarations.
namespace rt {
using ::cudaDeviceGetAttribute;
using ::cudaFuncSetAttribute;
using ::cudaGetDevice;
using ::cudaGetErrorString;
}  // namespace rt

}  // namespace phi
#endif

namespace phi {

// A CUDA runtime call that must succeed: throws with the call and the runtime's message.
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + rt::cudaGetErrorString(err));
  }
}

// The opt-in limit of dynamic shared memory per block on the current device (sm_80 163 KiB,
// sm_86 / sm_89 99 KiB, sm_90 227 KiB): what a launch may request after
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize).
inline int max_dynamic_smem_optin() {
  int device = 0, bytes = 0;
  cuda_check(rt::cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(rt::cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return bytes;
}

}  // namespace phi
