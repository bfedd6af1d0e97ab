// flash_attn/flash_attn_cpu.cpp compiled for AVX2 + FMA (x86-64-v3); see cpu_isa/isa.h.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <exception>
#include <vector>

#include "cpu_isa/isa.h"
#include "common/cpu_types.h"
#include "flash_attn/flash.h"
#include "flash_attn/flash_launch.h"

#define PHI_CPU_VEC_FLOATS 8
#define PHI_CPU_GEMM_ROWS 6
#define flash_fwd_cpu flash_fwd_cpu_avx2
#define flash_bwd_cpu flash_bwd_cpu_avx2
PHI_TARGET_AVX2
#include "flash_attn/flash_attn_cpu.cpp"
