// adam/adam_cpu.cpp compiled for the x86-64 baseline; see cpu_isa/isa.h.
#include <algorithm>
#include <vector>

#include "cpu_isa/isa.h"
#include "adam/adam.h"
#include "adam/adam_launch.h"
#include "common/cpu_types.h"

#define adam_cpu adam_cpu_baseline
#include "adam/adam_cpu.cpp"
