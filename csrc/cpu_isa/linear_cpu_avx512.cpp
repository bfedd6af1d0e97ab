// linear/linear_cpu.cpp compiled for AVX-512 (x86-64-v4); see cpu_isa/isa.h.
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

#define PHI_LINEAR_VEC_FLOATS 16
#define PHI_LINEAR_BLOCK_ROWS_1 8
#define PHI_LINEAR_BLOCK_ROWS_2 8
#define PHI_LINEAR_BLOCK_ROWS_4 4
#define linear_cpu linear_cpu_avx512
PHI_TARGET_AVX512
#include "linear/linear_cpu.cpp"
