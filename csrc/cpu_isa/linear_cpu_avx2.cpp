// linear/linear_cpu.cpp compiled for AVX2 + FMA + F16C (x86-64-v3); see cpu_isa/isa.h.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_isa/isa.h"
#include "common/cpu_types.h"
#include "linear/linear.h"
#include "linear/linear_launch.h"

#define PHI_LINEAR_VEC_FLOATS 8
#define PHI_LINEAR_BLOCK_ROWS_1 8
#define PHI_LINEAR_BLOCK_ROWS_2 4
#define PHI_LINEAR_BLOCK_ROWS_4 3
#define linear_cpu linear_cpu_avx2
PHI_TARGET_AVX2
#include "linear/linear_cpu.cpp"
