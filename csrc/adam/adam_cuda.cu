// Adam / AdamW, CUDA launch (the kernel: adam_kernel.cuh): the tensor lists are cut into
// multi-tensor block tables (multi_tensor_apply.cuh), one launch per table. The SIMT emulator
// compiles this same file as host C++ (csrc/simt/adam_emu.cpp): only launch_kernel differs.
#include "adam/adam_kernel.cuh"
#include "common/cuda_runtime.cuh"

#include <string>

namespace phi {

template <typename T> struct Dtype_name;
template <> struct Dtype_name<float> { static constexpr const char* value = "float"; };
template <> struct Dtype_name<__half> { static constexpr const char* value = "half"; };
template <> struct Dtype_name<__nv_bfloat16> { static constexpr const char* value = "bfloat16"; };

template <typename T, bool kAmsgrad, bool kMaster>
void adam_cuda_typed(const Adam_tensor_lists& l, const Adam_hparams& h, const Adam_device_scalars& s,
                     cudaStream_t stream) {
  void* const* lists[kMtaLists] = {
      l.params, const_cast<void* const*>(l.grads), reinterpret_cast<void* const*>(l.exp_avgs),
      reinterpret_cast<void* const*>(l.exp_avg_sqs),
      kAmsgrad ? reinterpret_cast<void* const*>(l.max_exp_avg_sqs) : nullptr,
      kMaster ? reinterpret_cast<void* const*>(l.masters) : nullptr};
  static const std::string name = std::string("adam_kernel<") + Dtype_name<T>::value + (kAmsgrad ? ", amsgrad" : "") +
                                  (kMaster ? ", master" : "") + ">";
  multi_tensor_apply(l.n_tensors, lists, l.numels, [&](const Mta_table& table, int n_blocks) {
    launch_kernel(name.c_str(), adam_kernel<T, kAmsgrad, kMaster>, dim3(n_blocks), dim3(kAdamThreads), 0, stream,
                  table, h, s);
  });
}

template <typename T>
void adam_cuda_dispatch(const Adam_tensor_lists& l, const Adam_hparams& h, const Adam_device_scalars& s,
                        cudaStream_t stream) {
  const bool master = l.masters != nullptr;
  if (h.amsgrad) {
    master ? adam_cuda_typed<T, true, true>(l, h, s, stream) : adam_cuda_typed<T, true, false>(l, h, s, stream);
  } else {
    master ? adam_cuda_typed<T, false, true>(l, h, s, stream) : adam_cuda_typed<T, false, false>(l, h, s, stream);
  }
}

void adam_cuda(const Adam_tensor_lists& l, const Adam_hparams& h, const Adam_device_scalars& s, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (l.dtype) {
    case DType::kFloat32: adam_cuda_dispatch<float>(l, h, s, st); break;
    case DType::kFloat16: adam_cuda_dispatch<__half>(l, h, s, st); break;
    case DType::kBFloat16: adam_cuda_dispatch<__nv_bfloat16>(l, h, s, st); break;
  }
}

}  // namespace phi
