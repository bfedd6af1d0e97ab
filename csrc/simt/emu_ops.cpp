// phi_kernels._simt: the torch.library namespace phi_kernels_emu, the "cuda-emu" backend. Its
// kernel ops have the schemas of phi_kernels' (op_schemas.h) and are registered for CPU tensors
// by the CUDA glue compiled with PHI_SIMT (emu_glue.cpp), which launches the CUDA kernels
// (emu_kernels_*.cpp) in the SIMT emulator (runtime.cpp). Besides them:
//   emu_stats() -> str         every kernel's counters since the last reset, as JSON (stats.h)
//   emu_stats_reset() -> ()
//   emu_max_dynamic_smem() -> int   the emulated arch's opt-in shared memory per block
//                                   (PHI_SIMT_ARCH, default sm_80)
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"
#include "simt/simt.h"
#include "simt/stats.h"

namespace phi::simt {
namespace {

std::string emu_stats() { return stats_json(); }
void emu_stats_reset() { stats_reset(); }
int64_t emu_max_dynamic_smem() { return max_dynamic_smem_optin(); }

}  // namespace
}  // namespace phi::simt

TORCH_LIBRARY(phi_kernels_emu, m) {
  phi::define_kernel_ops(m);
  m.def("emu_stats() -> str", &phi::simt::emu_stats);
  m.def("emu_stats_reset() -> ()", &phi::simt::emu_stats_reset);
  m.def("emu_max_dynamic_smem() -> int", &phi::simt::emu_max_dynamic_smem);
}

// A Python module with no functions: importing phi_kernels._simt registers the ops above.
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__simt(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_simt", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
