// Adam / AdamW, CUDA kernel over many tensors per launch (multi_tensor_apply.cuh); launch:
// adam_cuda.cu.
//
// Grid: one block per (tensor, 64K-element chunk) of the table; kAdamThreads threads stride
// through the chunk. Each element: read p (or its fp32 master), g, m, v (, vmax); update in fp32
// with the math of adam.h (shared with the CPU kernel); write back. Memory bound: 28 B per fp32
// param. Capturable: lr and step may be device scalars and found_inf a device flag, so a step
// needs no host synchronisation (CUDA graphs).
#pragma once
#include "adam/adam.h"
#include "adam/adam_launch.h"
#include "adam/multi_tensor_apply.cuh"
#include "common/cuda_types.cuh"
#include "common/ptx.cuh"

namespace phi {

constexpr int kAdamThreads = 512;

template <typename T, bool kAmsgrad, bool kMaster>
__global__ void __launch_bounds__(kAdamThreads) adam_kernel(const Mta_table table, Adam_hparams h,
                                                            const Adam_device_scalars s) {
  if (s.found_inf != nullptr && ld_global(s.found_inf) > 0.f) return;  // a non-finite grad: skip the step
  if (s.lr != nullptr) h.lr = ld_global(s.lr);
  if (s.step != nullptr) h.step = ld_global(s.step);
  if (s.grad_scale != nullptr) h.inv_grad_scale = 1.f / ld_global(s.grad_scale);
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
    float pi = kMaster ? ld_global(master + i) : to_float(ld_global(p + i));
    float mi = ld_global(m + i), vi = ld_global(v + i);
    float vmi = kAmsgrad ? ld_global(vmax + i) : 0.f;
    adam_update<kAmsgrad>(pi, to_float(ld_global(g + i)), mi, vi, vmi, h, c);
    st_global(m + i, mi);
    st_global(v + i, vi);
    if (kAmsgrad) st_global(vmax + i, vmi);
    if (kMaster) st_global(master + i, pi);
    st_global(p + i, from_float<T>(pi));
  }
}

}  // namespace phi
