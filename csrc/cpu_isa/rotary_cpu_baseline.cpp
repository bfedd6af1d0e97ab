// rotary/rotary_cpu.cpp compiled for the x86-64 baseline; see cpu_isa/isa.h.
#include "cpu_isa/isa.h"
#include "common/cpu_types.h"
#include "rotary/rotary.h"
#include "rotary/rotary_launch.h"

#define rotary_cpu rotary_cpu_baseline
#include "rotary/rotary_cpu.cpp"
