// One instantiation per file (parallel compilation): flash attention bwd, head_dim 128, fp16.
#include "flash_attn/flash_launch_cuda.cuh"

template void phi::flash::run_flash_bwd<phi::DType::kFloat16, 128>(const phi::Flash_params&, void*);
