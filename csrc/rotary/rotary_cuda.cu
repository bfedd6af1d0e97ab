// Rotary embedding, CUDA launch (the kernel: rotary_kernel.cuh). The SIMT emulator compiles
// this same file as host C++ (csrc/simt/rotary_emu.cpp): only launch_kernel differs.
#include "common/cuda_runtime.cuh"
#include "rotary/rotary_kernel.cuh"
#include "rotary/rotary_launch.h"

namespace phi {

void rotary_cuda(const Rotary_params& p, void* stream) {
  const int64_t blocks = int64_t((p.seqlen + kRotaryTokensPerBlock - 1) / kRotaryTokensPerBlock) * p.batch;
  if (blocks > 2147483647) throw std::runtime_error("rotary (cuda backend): more than 2^31 - 1 token blocks");
  const dim3 grid{unsigned(blocks)};
  const dim3 block(32, kRotaryTokensPerBlock);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: launch_kernel("rotary_kernel<float>", rotary_kernel<float>, grid, block, 0, s, p); break;
    case DType::kFloat16: launch_kernel("rotary_kernel<half>", rotary_kernel<__half>, grid, block, 0, s, p); break;
    case DType::kBFloat16:
      launch_kernel("rotary_kernel<bfloat16>", rotary_kernel<__nv_bfloat16>, grid, block, 0, s, p);
      break;
  }
}

}  // namespace phi
