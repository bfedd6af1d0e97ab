// The CUDA host glue of every op, compiled for the SIMT emulator (PHI_SIMT): the same sources as
// in phi_kernels._C, registered as phi_kernels_emu::* for CPU tensors. Included rather than
// listed as sources so the two builds' object files never share a path.
#include "adam/adam_cuda_ops.cpp"
#include "flash_attn/flash_attn_cuda_ops.cpp"
#include "rotary/rotary_cuda_ops.cpp"
