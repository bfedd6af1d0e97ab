// The CPU kernels' entry points (rotary_cpu, adam_cpu, flash_fwd_cpu, flash_bwd_cpu, linear_cpu): each calls
// the version compiled for the active capability (isa.h). Also the ops that report it:
//   phi_kernels::cpu_capability() -> str          the capability calls run with now
//   phi_kernels::cpu_capabilities() -> str[]      what this CPU supports
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "adam/adam_launch.h"
#include "cpu_isa/isa.h"
#include "flash_attn/flash_launch.h"
#include "linear/linear_launch.h"
#include "rotary/rotary_launch.h"

namespace phi {

#define PHI_DECLARE_ISA_VERSIONS(ret, name, ...) \
  ret name##_baseline(__VA_ARGS__);              \
  ret name##_avx2(__VA_ARGS__);                  \
  ret name##_avx512(__VA_ARGS__);
PHI_DECLARE_ISA_VERSIONS(void, rotary_cpu, const Rotary_params&)
PHI_DECLARE_ISA_VERSIONS(void, adam_cpu, const Adam_tensor_lists&, const Adam_hparams&)
PHI_DECLARE_ISA_VERSIONS(void, flash_fwd_cpu, const Flash_params&)
PHI_DECLARE_ISA_VERSIONS(void, flash_bwd_cpu, const Flash_params&)
PHI_DECLARE_ISA_VERSIONS(void, linear_cpu, const Linear_params&)
#undef PHI_DECLARE_ISA_VERSIONS

const char* capability_name(Cpu_capability c) {
  switch (c) {
    case Cpu_capability::kAvx2: return "avx2";
    case Cpu_capability::kAvx512: return "avx512";
    default: return "baseline";
  }
}

std::vector<Cpu_capability> supported_cpu_capabilities() {
  std::vector<Cpu_capability> caps{Cpu_capability::kBaseline};
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                    __builtin_cpu_supports("bmi2");
  if (!avx2) return caps;
  caps.push_back(Cpu_capability::kAvx2);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    caps.push_back(Cpu_capability::kAvx512);
  }
  return caps;
}

Cpu_capability active_cpu_capability() {
  static const std::vector<Cpu_capability> supported = supported_cpu_capabilities();
  const char* env = std::getenv("PHI_KERNELS_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return supported.back();
  const std::string want(env);
  for (Cpu_capability c : {Cpu_capability::kBaseline, Cpu_capability::kAvx2, Cpu_capability::kAvx512}) {
    if (want != capability_name(c)) continue;
    for (Cpu_capability s : supported) {
      if (s == c) return c;
    }
    TORCH_CHECK(false, "PHI_KERNELS_CPU_CAPABILITY=", want, ": this CPU does not support it (it supports ",
                capability_name(supported.back()), " and below)");
  }
  TORCH_CHECK(false, "PHI_KERNELS_CPU_CAPABILITY=", want, " is not a capability; expected baseline, avx2 or avx512");
}

#define PHI_DISPATCH_ISA(name, ...)                                    \
  switch (active_cpu_capability()) {                                   \
    case Cpu_capability::kAvx512: return name##_avx512(__VA_ARGS__);   \
    case Cpu_capability::kAvx2: return name##_avx2(__VA_ARGS__);       \
    default: return name##_baseline(__VA_ARGS__);                      \
  }

void rotary_cpu(const Rotary_params& p) { PHI_DISPATCH_ISA(rotary_cpu, p) }
void adam_cpu(const Adam_tensor_lists& l, const Adam_hparams& h) { PHI_DISPATCH_ISA(adam_cpu, l, h) }
void flash_fwd_cpu(const Flash_params& p) { PHI_DISPATCH_ISA(flash_fwd_cpu, p) }
void flash_bwd_cpu(const Flash_params& p) { PHI_DISPATCH_ISA(flash_bwd_cpu, p) }
void linear_cpu(const Linear_params& p) { PHI_DISPATCH_ISA(linear_cpu, p) }
#undef PHI_DISPATCH_ISA

namespace {

std::string cpu_capability_op() { return capability_name(active_cpu_capability()); }

std::vector<std::string> cpu_capabilities_op() {
  std::vector<std::string> names;
  for (Cpu_capability c : supported_cpu_capabilities()) names.push_back(capability_name(c));
  return names;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(phi_kernels, m) {
  m.def("cpu_capability() -> str", &cpu_capability_op);
  m.def("cpu_capabilities() -> str[]", &cpu_capabilities_op);
}

}  // namespace phi
