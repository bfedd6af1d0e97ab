// Entry point of the linear kernel, called by the binding in linear_ops.cpp (dispatched to the
// build for the running CPU by csrc/cpu_isa/cpu_dispatch.cpp).
#pragma once
#include "linear/linear.h"

namespace phi {

void linear_cpu(const Linear_params& params);

}  // namespace phi
