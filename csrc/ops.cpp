// phi_kernels._C: the torch.library namespace phi_kernels. Its kernel op schemas are in
// op_schemas.h; each op's CPU and CUDA implementations are registered beside its kernels
// (csrc/<op>/<op>_ops.cpp, <op>_cuda_ops.cpp).
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(phi_kernels, m) {
  phi::define_kernel_ops(m);
  // The launch the CUDA kernels would make for these arguments, [head_dim, grid_x, grid_y,
  // grid_z, threads, smem_bytes], or the error naming what they do not support. Pure host
  // code: the CPU tests check the CUDA host side with it.
  // (Takes flash attention's options so that the one params builder reads it like the kernel
  // ops; only the shapes matter.)
  m.def("flash_attn_cuda_plan(Tensor q, Tensor k, Tensor v, " PHI_FLASH_ATTN_OPTIONS
        ", Tensor out, Tensor lse, bool backward) -> int[]");
}

// A Python module with no functions: importing phi_kernels._C loads the library, and the
// static TORCH_LIBRARY registrations above make the ops visible as torch.ops.phi_kernels.*.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
