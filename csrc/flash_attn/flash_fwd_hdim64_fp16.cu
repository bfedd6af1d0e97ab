// One instantiation per file (parallel compilation): flash attention fwd, head_dim 64, fp16.
#include "flash_attn/flash_launch_cuda.cuh"

template void phi::flash::run_flash_fwd<phi::DType::kFloat16, 64>(const phi::Flash_params&, void*);
