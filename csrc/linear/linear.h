// Linear for a few rows (a decoding step): out = x W^T + b, the params struct the CPU kernel
// (linear_cpu.cpp) sees.
//
// Contract (checked in Python, phi_kernels/linear.py, and again in linear_ops.cpp, which also
// flattens x's leading dims into rows):
//   x    : (rows, in_features), row stride x_row_stride >= in_features, unit stride along a row.
//   w    : (out_features, in_features), contiguous (nn.Linear's weight as it is stored).
//   bias : (out_features,) contiguous, or nullptr.
//   out  : (rows, out_features), contiguous; never overlaps an input.
//   One dtype for all four (fp32, fp16 or bf16); products and sums in fp32, rounded once to the
//   dtype when out is written: out[m][n] = sum_k x[m][k] * w[n][k] + bias[n].
//   Made for few rows (the Python API sends rows <= kLinearKernelMaxRows here and larger
//   batches to torch's GEMM), but correct for any count. Indices are 64-bit.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace phi {

struct Linear_params {
  const void* x_ptr;
  const void* w_ptr;
  const void* bias_ptr;  // nullptr: no bias
  void* out_ptr;
  int64_t x_row_stride;  // in elements
  int64_t rows, out_features, in_features;
  DType dtype;
};

}  // namespace phi
