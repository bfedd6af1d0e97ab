// rotary/rotary_cpu.cpp compiled for AVX2 + FMA (x86-64-v3); see cpu_isa/isa.h.
#include "cpu_isa/isa.h"
#include "common/cpu_types.h"
#include "rotary/rotary.h"
#include "rotary/rotary_launch.h"

#define rotary_cpu rotary_cpu_avx2
PHI_TARGET_AVX2
#include "rotary/rotary_cpu.cpp"
