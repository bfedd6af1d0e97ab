// Adam / AdamW, CPU kernel: every tensor of the list in one call, cut into chunks that an
// OpenMP parallel loop balances across cores (a group of many small tensors parallelizes as
// well as one big one). The inner loop is branch-free per element so it vectorizes (for the ISA
// this file is compiled for: csrc/cpu_isa/); the math is adam.h's, shared with the CUDA kernel.
// No torch headers.
#include <algorithm>
#include <vector>

#include "adam/adam.h"
#include "adam/adam_launch.h"
#include "common/cpu_types.h"

namespace phi {
namespace {

constexpr int64_t kChunk = 16384;  // elements per task: 64 KB of fp32 per stream, L2-friendly

template <typename T, bool kAmsgrad, bool kMaster>
void adam_chunk(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                float* __restrict__ vmax, float* __restrict__ master, int64_t n, const Adam_hparams& h,
                const Adam_coeffs& coeffs) {
  // Local copies: the loop stores through float pointers that, to the compiler, might alias
  // the float fields of h and c, so it re-read (and re-derived, e.g. 1 - beta1) them for every
  // vector. Copies whose address never escapes live in registers.
  const Adam_hparams hp = h;
  const Adam_coeffs c = coeffs;
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float pi = kMaster ? master[i] : to_float(p[i]);
    float mi = m[i], vi = v[i];
    float vmi = kAmsgrad ? vmax[i] : 0.f;
    adam_update<kAmsgrad>(pi, to_float(g[i]), mi, vi, vmi, hp, c);
    m[i] = mi;
    v[i] = vi;
    if (kAmsgrad) vmax[i] = vmi;
    if (kMaster) master[i] = pi;
    p[i] = from_float<T>(pi);
  }
}

template <typename T, bool kAmsgrad, bool kMaster>
void adam_cpu_typed(const Adam_tensor_lists& l, const Adam_hparams& h) {
  const Adam_coeffs c = adam_coeffs(h);
  // (tensor, first element) of every chunk.
  std::vector<std::pair<int, int64_t>> chunks;
  for (int t = 0; t < l.n_tensors; ++t)
    for (int64_t s = 0; s < l.numels[t]; s += kChunk) chunks.emplace_back(t, s);
  const int64_t n_chunks = int64_t(chunks.size());
  // One chunk stays on the calling thread: no team to fork and join for a small tensor.
  #pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t k = 0; k < n_chunks; ++k) {
    const int t = chunks[k].first;
    const int64_t s = chunks[k].second;
    const int64_t n = std::min(kChunk, l.numels[t] - s);
    adam_chunk<T, kAmsgrad, kMaster>(static_cast<T*>(l.params[t]) + s, static_cast<const T*>(l.grads[t]) + s,
                                     l.exp_avgs[t] + s, l.exp_avg_sqs[t] + s,
                                     kAmsgrad ? l.max_exp_avg_sqs[t] + s : nullptr,
                                     kMaster ? l.masters[t] + s : nullptr, n, h, c);
  }
}

template <typename T>
void adam_cpu_dispatch(const Adam_tensor_lists& l, const Adam_hparams& h) {
  const bool master = l.masters != nullptr;
  if (h.amsgrad) {
    master ? adam_cpu_typed<T, true, true>(l, h) : adam_cpu_typed<T, true, false>(l, h);
  } else {
    master ? adam_cpu_typed<T, false, true>(l, h) : adam_cpu_typed<T, false, false>(l, h);
  }
}

}  // namespace

void adam_cpu(const Adam_tensor_lists& l, const Adam_hparams& h) {
  switch (l.dtype) {
    case DType::kFloat32: adam_cpu_dispatch<float>(l, h); break;
    case DType::kFloat16: adam_cpu_dispatch<Half>(l, h); break;
    case DType::kBFloat16: adam_cpu_dispatch<BFloat16>(l, h); break;
  }
}

}  // namespace phi
