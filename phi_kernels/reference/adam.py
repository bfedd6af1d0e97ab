"""Adam / AdamW in plain PyTorch: the `ref` backend of FusedAdam and the tests' oracle.

Same contract as the kernels (csrc/adam/adam.h): lists of tensors updated in place, fp32
math, torch.optim.Adam / AdamW semantics. It follows torch.optim's single-tensor code path
operation by operation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from phi_kernels._checks import FP32_MAX


@torch.no_grad()
def adam_step_ref(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    masters: list[Tensor],
    lr: float | Tensor,
    step: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adam_w_mode: bool,
    bias_correction: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    if found_inf is not None and float(found_inf) > 0:
        return
    lr, step = float(lr), float(step)
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    step_size = lr / bc1
    bc2_sqrt = math.sqrt(bc2)
    for i, p in enumerate(params):
        p32 = masters[i] if masters else p.float()
        g = grads[i].float()
        if grad_scale is not None:
            g = g / float(grad_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            if adam_w_mode:
                p32.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p32, alpha=weight_decay)
        exp_avgs[i].lerp_(g, 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        v = exp_avg_sqs[i]
        if max_exp_avg_sqs:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        if step_size <= FP32_MAX:
            p32.addcdiv_(exp_avgs[i], denom, value=-step_size)
        else:  # addcdiv_ refuses a scalar beyond float32; the kernels' fp32 math gives inf, so does this
            p32.sub_(exp_avgs[i] / denom * step_size)
        if p32.data_ptr() != p.data_ptr():
            p.copy_(p32)
