// Launch planning of the CUDA flash attention kernels: which instantiation runs a call, its
// grid, block and shared memory. Plain C++ over Flash_params and the kernel traits, so the
// CPU tests check it (phi_kernels::flash_attn_cuda_plan) without a GPU.
#pragma once
#include <cstdint>
#include <string>

#include "flash_attn/flash.h"
#include "flash_attn/kernel_traits.h"

namespace phi::flash {

struct Launch_plan {
  int head_dim;          // the instantiation's head_dim (64 or 128)
  int64_t grid_x;        // may exceed the 2^31 - 1 a launch allows: the host code refuses those
  int grid_y, grid_z;
  int threads;
  int smem_bytes;        // dynamic shared memory per CTA
};

// Head dims with compiled kernels. Empty string when supported, else the reason.
inline std::string cuda_unsupported(const Flash_params& p) {
  if (p.head_dim != 64 && p.head_dim != 128) {
    return "head_dim " + std::to_string(p.head_dim) + " (the CUDA kernels are compiled for 64 and 128)";
  }
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return "float32 inputs (the CUDA kernels take float16 and bfloat16)";
  }
  return "";
}

// grid.x enumerates (tile, sequence) pairs, tile fastest, and grid.y the heads: grid.x may hold
// 2^31 - 1 blocks while grid.y and grid.z stop at 65535, and a packed batch can hold more
// sequences than that. The kernels decode blockIdx.x with the same tile count (tiles_of).
template <class Traits>
Launch_plan plan_for(int tiles, int batch, int heads) {
  return {Traits::kHeadDim, int64_t(tiles) * batch, heads, 1, Traits::kThreads, Traits::kSmemBytes};
}

PHI_HOST_DEVICE int tiles_of(int seqlen, int tile) { return (seqlen + tile - 1) / tile; }

// Forward: one CTA per (query tile, sequence, head); the tiles cover the longest sequence and
// CTAs past a shorter sequence's end exit at once.
inline Launch_plan plan_fwd(const Flash_params& p) {
  if (p.head_dim <= 64) {
    using T = Fwd_traits<64>;
    return plan_for<T>(tiles_of(p.seqlen_q, T::kBlockM), p.batch, p.heads);
  }
  using T = Fwd_traits<128>;
  return plan_for<T>(tiles_of(p.seqlen_q, T::kBlockM), p.batch, p.heads);
}

// Backward: one CTA per (key tile, sequence, query head).
inline Launch_plan plan_bwd(const Flash_params& p) {
  if (p.head_dim <= 64) {
    using T = Bwd_traits<64>;
    return plan_for<T>(tiles_of(p.seqlen_k, T::kBlockN), p.batch, p.heads);
  }
  using T = Bwd_traits<128>;
  return plan_for<T>(tiles_of(p.seqlen_k, T::kBlockN), p.batch, p.heads);
}

}  // namespace phi::flash
