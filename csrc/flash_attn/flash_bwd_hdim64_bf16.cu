// One instantiation per file (parallel compilation): flash attention bwd, head_dim 64, bf16.
#include "flash_attn/flash_launch_cuda.cuh"

template void phi::flash::run_flash_bwd<phi::DType::kBFloat16, 64>(const phi::Flash_params&, void*);
