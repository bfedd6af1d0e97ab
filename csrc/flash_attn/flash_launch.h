// Entry points of the flash attention kernels, called by the bindings in flash_attn_ops.cpp.
#pragma once
#include "flash_attn/flash.h"

namespace phi {

void flash_fwd_cpu(const Flash_params& params);
void flash_bwd_cpu(const Flash_params& params);

namespace flash {
// CUDA launchers, one explicit instantiation per (dtype, head_dim) in flash_{fwd,bwd}_hdim*_*.cu.
// `stream` is a cudaStream_t, kept as void* so this header needs no CUDA headers.
template <DType kDtype, int kHeadDim>
void run_flash_fwd(const Flash_params& params, void* stream);
template <DType kDtype, int kHeadDim>
void run_flash_bwd(const Flash_params& params, void* stream);
}  // namespace flash

}  // namespace phi
