// CPU capabilities the CPU kernels are compiled for, and the one a call runs with.
//
// Each CPU kernel source (rotary/rotary_cpu.cpp, adam/adam_cpu.cpp, flash_attn/flash_attn_cpu.cpp)
// is compiled three times by the wrappers in this folder: for the x86-64 baseline (SSE2, what
// the rest of the extension is built for, so it loads on any x86-64), for AVX2 + FMA + F16C
// (x86-64-v3) and for AVX-512 (F, BW, DQ, VL: x86-64-v4), each under its own name
// (rotary_cpu_avx2, ...). The wrapper includes every header first, at the baseline, then raises
// the target with `#pragma GCC target` for the kernel's own code only, so no inline function
// shared with other files is ever compiled for a wider ISA than the baseline. cpu_dispatch.cpp
// defines rotary_cpu & co., which call the best version the running CPU supports (cpuid), or
// the one PHI_KERNELS_CPU_CAPABILITY names (baseline / avx2 / avx512).
#pragma once
#include <string>
#include <vector>

namespace phi {

enum class Cpu_capability : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

const char* capability_name(Cpu_capability c);
// What this CPU can run, in increasing order (always starts with baseline).
std::vector<Cpu_capability> supported_cpu_capabilities();
// The capability calls run with now: PHI_KERNELS_CPU_CAPABILITY if set (an error if this CPU
// lacks it, or the name is unknown), else the best supported.
Cpu_capability active_cpu_capability();

}  // namespace phi

#define PHI_TARGET_AVX2 _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe\")")
#define PHI_TARGET_AVX512 \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe\")")
