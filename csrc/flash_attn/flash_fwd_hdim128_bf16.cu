// One instantiation per file (parallel compilation): flash attention fwd, head_dim 128, bf16.
#include "flash_attn/flash_launch_cuda.cuh"

template void phi::flash::run_flash_fwd<phi::DType::kBFloat16, 128>(const phi::Flash_params&, void*);
