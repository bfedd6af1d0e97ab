// Entry points of the flash attention kernels, called by the bindings in flash_attn_ops.cpp.
#pragma once
#include "flash_attn/flash.h"

namespace phi {

void flash_fwd_cpu(const Flash_params& params);
void flash_bwd_cpu(const Flash_params& params);

#ifdef PHI_WITH_CUDA
// `stream` is a cudaStream_t, kept as void* so this header needs no CUDA headers.
void flash_fwd_cuda(const Flash_params& params, void* stream);
void flash_bwd_cuda(const Flash_params& params, void* stream);
#endif

}  // namespace phi
