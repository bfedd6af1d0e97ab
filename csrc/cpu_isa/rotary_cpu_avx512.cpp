// rotary/rotary_cpu.cpp compiled for AVX-512 (x86-64-v4); see cpu_isa/isa.h.
#include "cpu_isa/isa.h"
#include "common/cpu_types.h"
#include "rotary/rotary.h"
#include "rotary/rotary_launch.h"

#define rotary_cpu rotary_cpu_avx512
PHI_TARGET_AVX512
#include "rotary/rotary_cpu.cpp"
