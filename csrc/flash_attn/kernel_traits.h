// Compile-time tile shapes of the CUDA flash attention kernels, one traits struct per
// (pass, head_dim). Plain C++ (no CUDA headers): the launch planning in flash_plan.h and the
// host tests read the same constants the kernels are compiled with.
#pragma once

namespace phi::flash {

// Forward: each warp owns 16 query rows (one mma M tile) and all of their columns, so the
// softmax row max / sum need only the 4 lanes that share a row. K and V tiles of kBlockN
// keys stream through shared memory with cp.async (V's load overlaps Q K^T, the next K's
// overlaps P V). hd64 uses 128-key tiles: twice the work per barrier at 64 score registers.
template <int kHeadDim_>
struct Fwd_traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 4;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kBlockM = 16 * kNWarps;
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : 64;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * 2;  // Q, K, V tiles (16-bit)
};

// Backward: one CTA per (key tile, batch, head) holds dK, dV of its kBlockN keys in registers
// and walks the query tiles that see them (flash-attention 2's loop order), the next Q / dO
// tile loading while the current one is used. 8 warps on a 4 x 2
// grid: rows 16 * (warp % 4), column half warp / 4 of every product, which keeps dK, dV, dQ
// and the score tiles at <= 32 registers each for head_dim 128.
template <int kHeadDim_>
struct Bwd_traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 8;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  // Q, dO (kBlockM x d, two buffers each), K, V (kBlockN x d), P, dS (kBlockM x kBlockN), 16-bit.
  static constexpr int kSmemBytes = (4 * kBlockM + 2 * kBlockN) * kHeadDim * 2 + 2 * kBlockM * kBlockN * 2;
};

}  // namespace phi::flash
