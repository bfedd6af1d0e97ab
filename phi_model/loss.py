"""The language-model loss fused with the output projection. The op lives in phi_kernels
(phi_kernels/fused_linear_cross_entropy.py, with its reference and tests); phi_model keeps
this name for its callers."""
from phi_kernels.fused_linear_cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy

__all__ = ["IGNORE_INDEX", "fused_linear_cross_entropy"]
