// The instruction wrappers the CUDA kernels are written against: inline PTX under nvcc
// (common/ptx_sm80.cuh), the SIMT emulator's executable versions when the kernels are compiled
// as host C++ (PHI_SIMT, csrc/simt/ptx_emu.h). Nothing else differs between the two builds.
#pragma once
#ifdef PHI_SIMT
#include "simt/ptx_emu.h"
#else
#include "common/ptx_sm80.cuh"
#endif
