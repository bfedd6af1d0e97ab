// Rotary embedding, CUDA kernel. Contract and math: rotary.h (shared with the CPU kernel);
// launch: rotary_cuda.cu.
//
// Grid: ceil(seqlen / kRotaryTokensPerBlock) x batch blocks in grid.x (token block fastest;
// grid.y would stop at 65535 sequences). Block: (32, kRotaryTokensPerBlock): one
// warp per token; its lanes walk that token's work items, heads x (rotary pairs + pass-through
// dims), so the pass-through copy happens in the same launch. The op is memory bound: one read
// and one write of every element of x, plus the cos/sin row (cached in L1/L2, shared by heads).
#pragma once
#include "common/cuda_types.cuh"
#include "common/ptx.cuh"
#include "rotary/rotary.h"

namespace phi {

constexpr int kRotaryTokensPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(32 * kRotaryTokensPerBlock) rotary_kernel(const Rotary_params p) {
  const int n_blocks = (p.seqlen + kRotaryTokensPerBlock - 1) / kRotaryTokensPerBlock;
  const int b = blockIdx.x / n_blocks;
  const int t = (blockIdx.x % n_blocks) * kRotaryTokensPerBlock + threadIdx.y;
  int64_t start;
  int len;
  rotary_seq_bounds(p, b, start, len);
  if (t >= len) return;
  const int64_t pos = int64_t(t) + rotary_offset(p, b);
  const int half = p.rotary_dim / 2;
  const T* __restrict__ cos = static_cast<const T*>(p.cos_ptr) + pos * half;
  const T* __restrict__ sin = static_cast<const T*>(p.sin_ptr) + pos * half;
  const T* x = static_cast<const T*>(p.x_ptr) + rotary_x_offset(p, b, start + t);
  T* out = static_cast<T*>(p.out_ptr) + rotary_out_offset(p, b, start + t);
  const int n_pass = p.inplace ? 0 : p.head_dim - p.rotary_dim;
  const int per_head = half + n_pass;
  for (int j = threadIdx.x; j < p.nheads * per_head; j += 32) {
    const int h = j / per_head;
    const int k = j - h * per_head;
    const T* xh = x + h * p.x_head_stride;
    T* oh = out + h * p.out_head_stride;
    if (k < half) {
      int i0, i1;
      rotary_pair_index(k, p.rotary_dim, p.interleaved, i0, i1);
      float o0, o1;
      rotary_rotate(to_float(ld_global(xh + i0)), to_float(ld_global(xh + i1)), to_float(ld_global(cos + k)),
                    to_float(ld_global(sin + k)), p.conjugate, o0, o1);
      st_global(oh + i0, from_float<T>(o0));
      st_global(oh + i1, from_float<T>(o1));
    } else {
      const int d = p.rotary_dim + (k - half);
      st_global(oh + d, ld_global(xh + d));
    }
  }
}

}  // namespace phi
