// adam/adam_cpu.cpp compiled for AVX-512 (x86-64-v4); see cpu_isa/isa.h.
#include <algorithm>
#include <vector>

#include "cpu_isa/isa.h"
#include "adam/adam.h"
#include "adam/adam_launch.h"
#include "common/cpu_types.h"

#define adam_cpu adam_cpu_avx512
PHI_TARGET_AVX512
#include "adam/adam_cpu.cpp"
