"""phi-kernels: phi-1.5's hot paths on hand-written CUDA C++, Triton and CPU C++ kernels.

Every op has five backends (see phi_kernels._backends): "cuda", "cuda-emu" (the CUDA kernels on
CPU tensors under a SIMT emulator, for testing), "triton", "cpu", "ref".
`available_backends()` tells which run here and why not.
"""
from phi_kernels import _extension
from phi_kernels._backends import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    backend_status,
)
from phi_kernels.adam import FusedAdam
from phi_kernels.flash_attn import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
from phi_kernels.flash_attn_kvcache import flash_attn_with_kvcache
from phi_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from phi_kernels.linear import linear
from phi_kernels.rotary import apply_rotary, apply_rotary_qkv, rotary_cos_sin

_extension.load_error()  # load the compiled ops (phi_kernels._C, phi_kernels._simt) now, if they were built

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "FusedAdam",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "fused_linear_cross_entropy",
    "linear",
    "available_backends",
    "backend_status",
    "apply_rotary",
    "apply_rotary_qkv",
    "rotary_cos_sin",
]
__version__ = "0.1.0"
