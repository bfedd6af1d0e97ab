// Tensor glue of phi_kernels::linear_out for CPU tensors (schema in csrc/op_schemas.h): checks
// what the kernel relies on (the Python API, phi_kernels/linear.py, has already given friendlier
// errors), fills Linear_params and runs the CPU kernel. There is no CUDA kernel: on a GPU the
// Python API calls F.linear (cuBLAS).
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/bind_utils.h"
#include "linear/linear.h"
#include "linear/linear_launch.h"

namespace phi {
namespace {

// x (..., in_features) and out (..., out_features) are seen as (rows, features) matrices (a
// view when x's leading dims allow it, else a copy; likewise a copy when x is strided along its
// last dim, and for a strided bias), so the Python side hands its tensors over as they are.
// Every check runs before anything is written.
void linear_out_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                    const at::Tensor& out) {
  const DType dtype = to_phi_dtype(x_in, "x");
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type() && out.scalar_type() == x_in.scalar_type(),
              "x, weight and out must share a dtype, got ", x_in.scalar_type(), ", ", weight.scalar_type(), ", ",
              out.scalar_type());
  PHI_CHECK_DEVICE(weight, x_in);
  PHI_CHECK_DEVICE(out, x_in);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous 2-D (out_features, in_features) tensor, got shape ", weight.sizes(),
              " strides ", weight.strides());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == k, "x must be (..., in_features = ", k, "), got shape ",
              x_in.sizes());
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = n;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "out must have shape ", at::IntArrayRef(out_shape), ", got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous, got strides ", out.strides());
  TORCH_CHECK(!bytes_overlap(out, x_in) && !bytes_overlap(out, weight), "out overlaps x or weight");
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == n, "bias must have shape (", n, "), got ", bias_in->sizes());
    TORCH_CHECK(bias_in->scalar_type() == x_in.scalar_type(), "bias must be ", x_in.scalar_type(), ", got ",
                bias_in->scalar_type());
    PHI_CHECK_DEVICE(*bias_in, x_in);
    TORCH_CHECK(!bytes_overlap(out, *bias_in), "out overlaps bias");
    bias = bias_in->contiguous();
  }
  const int64_t rows = c10::multiply_integers(x_in.sizes().begin(), x_in.sizes().end() - 1);
  if (rows == 0 || n == 0) return;
  at::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({rows, k});
  if (x.stride(1) != 1 && k > 1) x = x.contiguous();

  Linear_params p{};
  p.x_ptr = device_ptr(x, "x");
  p.w_ptr = device_ptr(weight, "weight");
  p.bias_ptr = bias.has_value() ? device_ptr(*bias, "bias") : nullptr;
  p.out_ptr = device_ptr(out, "out");
  p.x_row_stride = x.stride(0);
  p.rows = rows;
  p.out_features = n;
  p.in_features = k;
  p.dtype = dtype;
  linear_cpu(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) { m.impl("linear_out", &linear_out_cpu); }

}  // namespace phi
