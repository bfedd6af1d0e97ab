// linear/linear_cpu.cpp compiled for the x86-64 baseline; see cpu_isa/isa.h.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_isa/isa.h"
#include "common/cpu_types.h"
#include "linear/linear.h"
#include "linear/linear_launch.h"

#define PHI_LINEAR_VEC_FLOATS 4
#define PHI_LINEAR_BLOCK_ROWS_1 8
#define PHI_LINEAR_BLOCK_ROWS_2 4
#define PHI_LINEAR_BLOCK_ROWS_4 2
#define linear_cpu linear_cpu_baseline
#include "linear/linear_cpu.cpp"
