// The flash attention forward instantiations (the same .cu files nvcc compiles), compiled as
// host C++ for the SIMT emulator (PHI_SIMT).
#include "flash_attn/flash_fwd_hdim128_bf16.cu"
#include "flash_attn/flash_fwd_hdim128_fp16.cu"
#include "flash_attn/flash_fwd_hdim64_bf16.cu"
#include "flash_attn/flash_fwd_hdim64_fp16.cu"
