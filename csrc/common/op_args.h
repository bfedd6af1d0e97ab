// The arguments of one op call, read by name. The flash attention and rotary ops are registered
// as boxed kernels (torch::CppFunction::makeFromBoxedFunction): the dispatcher hands them the
// call's arguments as a stack of IValues in schema order, and each op's one params builder
// (make_params in flash_attn_bind.h, make_rotary_params in rotary_bind.h) reads them here by the
// names the schema gives them (op_schemas.h). So an option is added in the schema, the params
// struct and its builder, and no C++ function signature lists the op's arguments.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <vector>

namespace phi {

class Op_args {
 public:
  Op_args(const c10::OperatorHandle& op, const torch::jit::Stack* stack)
      : schema_(op.schema()), args_(torch::jit::last(stack, op.schema().arguments().size())) {}

  const at::Tensor& tensor(std::string_view name) const { return at(name).toTensor(); }
  std::optional<at::Tensor> optional_tensor(std::string_view name) const {
    const c10::IValue& v = at(name);
    return v.isNone() ? std::nullopt : std::optional<at::Tensor>(v.toTensor());
  }
  int64_t integer(std::string_view name) const { return at(name).toInt(); }
  double real(std::string_view name) const { return at(name).toDouble(); }
  bool boolean(std::string_view name) const { return at(name).toBool(); }

 private:
  const c10::IValue& at(std::string_view name) const {
    const std::optional<int> i = schema_.argumentIndexWithName(name);
    TORCH_CHECK(i.has_value(), schema_.name(), " has no argument ", name);  // a builder / schema mismatch
    return args_[*i];
  }

  const c10::FunctionSchema& schema_;
  c10::ArrayRef<c10::IValue> args_;
};

// A boxed kernel from `void fn(const Op_args&)` (an op returning nothing: it writes into the
// tensors it is given).
template <void (*Fn)(const Op_args&)>
void boxed_out_op(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  Fn(Op_args(op, stack));
  torch::jit::drop(stack, op.schema().arguments().size());
}

// A boxed kernel from `std::vector<int64_t> fn(const Op_args&)` (an op returning int[]).
template <std::vector<int64_t> (*Fn)(const Op_args&)>
void boxed_int_list_op(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  std::vector<int64_t> result = Fn(Op_args(op, stack));
  torch::jit::drop(stack, op.schema().arguments().size());
  torch::jit::push(stack, c10::IValue(std::move(result)));
}

// For m.impl("name", out_op<fn>()) / int_list_op<fn>().
template <void (*Fn)(const Op_args&)>
torch::CppFunction out_op() {
  return torch::CppFunction::makeFromBoxedFunction<&boxed_out_op<Fn>>();
}
template <std::vector<int64_t> (*Fn)(const Op_args&)>
torch::CppFunction int_list_op() {
  return torch::CppFunction::makeFromBoxedFunction<&boxed_int_list_op<Fn>>();
}

}  // namespace phi
