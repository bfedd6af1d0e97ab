// Launchers of the CUDA flash attention kernels: the grid / block / shared memory come from
// flash_plan.h (the same plan the CPU tests check). Each flash_{fwd,bwd}_hdim*_*.cu file
// instantiates one of these for one (dtype, head_dim), so the kernels compile in parallel; the
// SIMT emulator compiles the same files as host C++ (csrc/simt/flash_emu_*.cpp).
#pragma once
#include "common/cuda_runtime.cuh"
#include "common/cuda_types.cuh"
#include "flash_attn/flash_bwd_kernel.cuh"
#include "flash_attn/flash_fwd_kernel.cuh"
#include "flash_attn/flash_launch.h"
#include "flash_attn/flash_plan.h"

namespace phi::flash {

template <DType kDtype> struct Cuda_type;
template <> struct Cuda_type<DType::kFloat16> { using type = __half; static constexpr const char* name = "fp16"; };
template <> struct Cuda_type<DType::kBFloat16> {
  using type = __nv_bfloat16;
  static constexpr const char* name = "bf16";
};

template <typename Kernel>
void launch(const std::string& name, Kernel kernel, const Launch_plan& plan, const Flash_params& p, void* stream) {
  if (plan.smem_bytes > 48 * 1024) {  // above the default: opt in to the large carve-out
    cuda_check(rt::cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  launch_kernel(name.c_str(), kernel, dim3(unsigned(plan.grid_x), plan.grid_y, plan.grid_z), dim3(plan.threads),
                size_t(plan.smem_bytes), static_cast<cudaStream_t>(stream), p);
}

template <DType kDtype, int kHeadDim>
void run_flash_fwd(const Flash_params& p, void* stream) {
  const std::string name = "flash_fwd_kernel<hdim" + std::to_string(kHeadDim) + ", " + Cuda_type<kDtype>::name + ">";
  launch(name, flash_fwd_kernel<Fwd_traits<kHeadDim>, typename Cuda_type<kDtype>::type>, plan_fwd(p), p, stream);
}

template <DType kDtype, int kHeadDim>
void run_flash_bwd(const Flash_params& p, void* stream) {
  const std::string name = "flash_bwd_kernel<hdim" + std::to_string(kHeadDim) + ", " + Cuda_type<kDtype>::name + ">";
  launch(name, flash_bwd_kernel<Bwd_traits<kHeadDim>, typename Cuda_type<kDtype>::type>, plan_bwd(p), p, stream);
}

}  // namespace phi::flash
