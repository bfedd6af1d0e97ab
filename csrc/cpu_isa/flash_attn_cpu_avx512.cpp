// flash_attn/flash_attn_cpu.cpp compiled for AVX-512 (x86-64-v4); see cpu_isa/isa.h.
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

#define flash_fwd_cpu flash_fwd_cpu_avx512
#define flash_bwd_cpu flash_bwd_cpu_avx512
PHI_TARGET_AVX512
#include "flash_attn/flash_attn_cpu.cpp"
