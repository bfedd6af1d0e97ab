// adam/adam_cpu.cpp compiled for AVX2 + FMA (x86-64-v3); see cpu_isa/isa.h.
#include <algorithm>
#include <vector>

#include "cpu_isa/isa.h"
#include "adam/adam.h"
#include "adam/adam_launch.h"
#include "common/cpu_types.h"

#define adam_cpu adam_cpu_avx2
PHI_TARGET_AVX2
#include "adam/adam_cpu.cpp"
