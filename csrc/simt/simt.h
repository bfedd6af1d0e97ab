// The SIMT emulator's CUDA prelude: what the CUDA kernels and launchers of this project need
// from nvcc and the CUDA runtime, implemented on the host so the *unchanged* kernel sources
// compile as C++ and run on CPU memory (see runtime.cpp for how, README for what it checks).
//
// Included instead of <cuda_runtime.h> by common/cuda_runtime.cuh when PHI_SIMT is defined.
// Provided:
//   keywords        __global__ / __device__ / __forceinline__ / __align__ (the toolkit's host
//                   definitions), __launch_bounds__ (ignored), __shared__ (= thread_local: a
//                   CTA runs on one OS thread, its CUDA threads are fibers of that thread)
//   built-ins       threadIdx, blockIdx, blockDim, gridDim; __syncthreads; __shfl_xor_sync,
//                   __shfl_sync (full-warp masks); atomicAdd(float); __cvta_generic_to_shared
//   runtime API     cudaStream_t, cudaError_t, cudaFuncSetAttribute(MaxDynamicSharedMemorySize),
//                   cudaGetDevice, cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin),
//                   cudaGetErrorString, and phi::launch_kernel (the `<<<>>>` of this build)
// The PTX wrappers (cp.async, ldmatrix, mma, st.shared, global accessors) are in ptx_emu.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __launch_bounds__(...)
#undef __shared__
#define __shared__ thread_local

using std::max;
using std::min;

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace phi::simt {

// ---- what kernels call (runtime.cpp); each is an instruction of one CUDA thread, and the
// warp-wide ones (shuffles, ldmatrix, mma) are rendezvous of the 32 lanes.
void syncthreads();
uint32_t shfl(uint32_t value, int lane_arg, int width, bool xor_mode, unsigned mask);
float atomic_add(float* p, float v);
uint32_t cvta_to_shared(const void* p);
const void* checked_global(const void* p, unsigned long bytes, bool write);
void cp_async_16(uint32_t dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans);
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void st_shared_b32(uint32_t addr, uint32_t v);

// ---- what launchers and host glue call
// Runs `thunk(ctx)` as every thread of a grid x block launch with `smem` bytes of dynamic
// shared memory. Throws std::runtime_error (naming `name`) when the launch is invalid or the
// kernel misbehaves (races, out-of-bounds accesses, deadlocks); see runtime.cpp.
void run_launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, void (*thunk)(void*),
                void* ctx);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
int emulated_sm();            // 80, 86, 89 or 90 (PHI_SIMT_ARCH=sm_86, ...; default sm_80)
int max_dynamic_smem_optin();  // that arch's per-block opt-in limit

// The global memory a launch may touch: every tensor the host glue handed a pointer of to
// the kernels while a Memory_scope was open on this thread (see phi::device_ptr).
void register_region(const void* p, size_t bytes, const char* name);
struct Memory_scope {
  Memory_scope();
  ~Memory_scope();
  Memory_scope(const Memory_scope&) = delete;
  Memory_scope& operator=(const Memory_scope&) = delete;
};

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  // Kernel arguments are copied once, like the by-value parameter buffer of a real launch;
  // every thread then receives its own copy of each parameter.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...>* params;
  } ctx{kernel, &params};
  run_launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem,
             [](void* c) {
               auto* x = static_cast<Ctx*>(c);
               std::apply(x->kernel, *x->params);
             },
             &ctx);
}

}  // namespace phi::simt

inline void __syncthreads() { phi::simt::syncthreads(); }

template <typename T>
inline T simt_shfl_(T v, int arg, int width, bool xor_mode, unsigned mask) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = phi::simt::shfl(u, arg, width, xor_mode, mask);
  std::memcpy(&v, &u, 4);
  return v;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt_shfl_(v, lane_mask, width, true, mask);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return simt_shfl_(v, src_lane, width, false, mask);
}
inline float atomicAdd(float* p, float v) { return phi::simt::atomic_add(p, v); }
inline size_t __cvta_generic_to_shared(const void* p) { return phi::simt::cvta_to_shared(p); }

namespace phi {

// The CUDA runtime calls the launchers make (qualified, rt::...), answered by the emulator.
namespace rt {
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return simt::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = simt::max_dynamic_smem_optin();
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : err == cudaErrorInvalidValue ? "invalid argument" : "emulated CUDA error";
}
}  // namespace rt

// The `<<<grid, block, smem, stream>>>` of the emulator build: runs the kernel to completion
// (the emulated stream is synchronous).
template <typename... Params, typename... Args>
inline void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t /*stream*/, Args&&... args) {
  simt::launch(name, kernel, grid, block, smem, std::forward<Args>(args)...);
}

}  // namespace phi
