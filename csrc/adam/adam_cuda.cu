// Adam / AdamW, CUDA kernel over many tensors per launch (multi_tensor_apply.cuh).
//
// Grid: one block per (tensor, 64K-element chunk) of the table; 512 threads stride through the
// chunk. Each element: read p (or its fp32 master), g, m, v (, vmax); update in fp32 with the
// math of adam.h (shared with the CPU kernel); write back. Memory bound: 28 B per fp32 param.
// Capturable: lr and step may be device scalars and found_inf a device flag, so a step
// needs no host synchronisation (CUDA graphs).
#include <cuda_runtime.h>

#include "adam/adam.h"
#include "adam/adam_launch.h"
#include "adam/multi_tensor_apply.cuh"
#include "common/cuda_types.cuh"

namespace phi {

constexpr int kAdamThreads = 512;

template <typename T, bool kAmsgrad, bool kMaster>
__global__ void __launch_bounds__(kAdamThreads) adam_kernel(const Mta_table table, Adam_hparams h,
                                                            const Adam_device_scalars s) {
  if (s.found_inf != nullptr && *s.found_inf > 0.f) return;  // a non-finite grad: skip the step
  if (s.lr != nullptr) h.lr = *s.lr;
  if (s.step != nullptr) h.step = *s.step;
  if (s.grad_scale != nullptr) h.inv_grad_scale = 1.f / *s.grad_scale;
  const Adam_coeffs c = adam_coeffs(h);

  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = int64_t(table.block_chunk[blockIdx.x]) * kMtaChunk;
  const int64_t end = min(start + kMtaChunk, table.numels[t]);
  T* p = static_cast<T*>(table.addrs[0][t]);
  const T* g = static_cast<const T*>(table.addrs[1][t]);
  float* m = static_cast<float*>(table.addrs[2][t]);
  float* v = static_cast<float*>(table.addrs[3][t]);
  float* vmax = static_cast<float*>(table.addrs[4][t]);
  float* master = static_cast<float*>(table.addrs[5][t]);
  for (int64_t i = start + threadIdx.x; i < end; i += kAdamThreads) {
    float pi = kMaster ? master[i] : to_float(p[i]);
    float mi = m[i], vi = v[i];
    float vmi = kAmsgrad ? vmax[i] : 0.f;
    adam_update<kAmsgrad>(pi, to_float(g[i]), mi, vi, vmi, h, c);
    m[i] = mi;
    v[i] = vi;
    if (kAmsgrad) vmax[i] = vmi;
    if (kMaster) master[i] = pi;
    p[i] = from_float<T>(pi);
  }
}

template <typename T, bool kAmsgrad, bool kMaster>
void adam_cuda_typed(const Adam_tensor_lists& l, const Adam_hparams& h, const Adam_device_scalars& s,
                     cudaStream_t stream) {
  void* const* lists[kMtaLists] = {
      l.params, const_cast<void* const*>(l.grads), reinterpret_cast<void* const*>(l.exp_avgs),
      reinterpret_cast<void* const*>(l.exp_avg_sqs),
      kAmsgrad ? reinterpret_cast<void* const*>(l.max_exp_avg_sqs) : nullptr,
      kMaster ? reinterpret_cast<void* const*>(l.masters) : nullptr};
  multi_tensor_apply(l.n_tensors, lists, l.numels, [&](const Mta_table& table, int n_blocks) {
    adam_kernel<T, kAmsgrad, kMaster><<<n_blocks, kAdamThreads, 0, stream>>>(table, h, s);
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
