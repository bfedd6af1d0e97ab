"""Linear layer + cross entropy in plain PyTorch (the oracle of phi_kernels.fused_linear_cross_entropy).

It materialises the (N, V) logits in fp32 and lets F.cross_entropy and autograd do the rest:
clear, and exactly what the fused op must equal. Labels are F.cross_entropy's to judge here
(an out-of-range label is its error, not a ValueError).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def fused_linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                                   ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Cross entropy of F.linear(hidden, weight, bias) (computed in fp32) against targets.
    reduction "sum", or "mean" over the targets that are not ignore_index, where no such target
    gives 0 (F.cross_entropy's mean gives NaN there; the fused op's convention is 0)."""
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp_min(1).to(total.dtype)
