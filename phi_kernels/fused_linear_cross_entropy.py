"""Fused linear + cross entropy: the language-model loss taken straight from the last hidden
states, without ever holding the (tokens, vocab) logits (Liger-Kernel's "fused linear cross
entropy", written with PyTorch matmuls on every device).

    loss = fused_linear_cross_entropy(hidden, lm_head.weight, lm_head.bias, targets)

equals F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)
(oracle: phi_kernels/reference/fused_linear_cross_entropy.py).

Contract: hidden (N, C) and weight (V, C) (bias (V,) or None) share one floating dtype and
device; targets (N,) int64, each in [0, V) or ignore_index. The logits, the softmax and the
loss are computed in fp32 per chunk of `chunk_rows` rows; d weight and d bias accumulate in
fp32 across chunks and are rounded once to weight's dtype. reduction "mean" divides by the
number of targets that are not ignore_index ("mean" over no target is 0, not NaN: a batch
with every label ignored then adds no gradient instead of poisoning the run), "sum" does not.

Why it saves memory: each chunk's gradients (softmax - onehot, then d hidden, d weight, d bias)
are formed during the forward while its logits are in cache; the backward only scales them by
the incoming gradient. For phi-1.5 (vocab 51200) at 16k tokens that is 3.3 GB of fp32 logits
(and as much again for their gradient) never allocated; on the CPU it also saves the separate
log-softmax passes. The price: the gradients are computed even if backward is never called
(they are skipped when no input requires grad).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from phi_kernels._checks import is_int as _is_int

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int,
                ignore_index: int, reduction: str):
        valid = targets != ignore_index  # (N,)
        if reduction == "mean":
            scale = 1.0 / valid.sum().clamp_min(1).to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        safe_targets = torch.where(valid, targets, 0)  # ignored rows gather a real column, then count 0
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        # d weight and d bias are set by the first chunk and accumulated by the others: no
        # zero-filled (V, C) fp32 buffer (a pass over 420 MB for phi-1.5's lm_head, and a fresh
        # allocation's page faults on the CPU, every step).
        grad_weight = grad_bias = None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]  # (n, C)
            t = safe_targets[start:start + chunk_rows, None]  # (n, 1)
            keep = valid[start:start + chunk_rows]  # (n,)
            logits = F.linear(h, weight, bias).float()  # (n, V)
            picked = logits.gather(1, t)[:, 0]
            # log-sum-exp by hand, in place: logits becomes exp(logits - max), which the gradient
            # reuses (torch.logsumexp would allocate its own temporaries).
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            sums = exps.sum(dim=-1)
            lse = row_max[:, 0] + sums.log()
            loss += torch.where(keep, lse - picked, 0.0).sum()
            if not want_grads:
                continue
            # d(loss)/d logits = (softmax - onehot) * keep * scale, built in place in exps.
            row_weight = keep * scale  # (n,) fp32
            grad_logits = exps.mul_((row_weight / sums)[:, None])
            grad_logits.scatter_add_(1, t, -row_weight[:, None])
            g = grad_logits.to(hidden.dtype)
            grad_hidden[start:start + chunk_rows] = g @ weight  # (n, C)
            if grad_weight is None:
                grad_weight, grad_bias = torch.mm(g.t().float(), h.float()), grad_logits.sum(0)  # (V, C), (V,)
            else:
                grad_weight.addmm_(g.t().float(), h.float())
                grad_bias += grad_logits.sum(0)
        if want_grads and grad_weight is None:  # no rows: zero gradients
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        if want_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype))
        ctx.has_bias = bias is not None
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype),
                grad_bias * grad_loss.to(grad_bias.dtype) if ctx.has_bias else None, None, None, None, None)


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check(hidden, weight, bias, targets, chunk_rows, ignore_index, reduction) -> None:
    """F.linear's and F.cross_entropy's rules, as ValueErrors (TypeErrors for non-tensors) naming
    the argument, before anything is computed."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, C) and weight (V, C), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)
                             or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be None or a {weight.dtype} tensor of shape (V,) = ({weight.shape[0]},), "
                         f"got {_describe(bias)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 of shape ({hidden.shape[0]},) (the labels), got "
                         f"{targets.dtype}{tuple(targets.shape)}")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, bias and targets must be on one device, got {sorted(map(str, devices))}")
    if not _is_int(chunk_rows) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    if not _is_int(ignore_index):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    vocab = weight.shape[0]
    if torch.compiler.is_compiling() or not targets.numel():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {vocab}) or {ignore_index} (ignore_index) (the labels), got "
                             f"{int(targets[bad][0])}")
    else:  # a device-side assert, no host sync (as F.cross_entropy on a GPU)
        torch._assert_async(~bad.any(), f"fused_linear_cross_entropy: targets (labels) out of [0, {vocab}) and "
                                        f"not {ignore_index} (ignore_index)")


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                               chunk_rows: int = 1024, *, ignore_index: int = IGNORE_INDEX,
                               reduction: str = "mean") -> Tensor:
    """Cross entropy of softmax(hidden @ weight.T + bias) against targets, an fp32 scalar,
    without materialising the logits. hidden (N, C), weight (V, C), bias (V,) or None, targets
    (N,) int64; targets equal to ignore_index count for nothing. reduction "mean" (over the
    targets not ignored; 0 when there are none) or "sum". Differentiable w.r.t. hidden, weight
    and bias.

    targets (the labels) are checked as F.cross_entropy checks them: int64, shape (N,), every
    value in [0, V) or ignore_index. On the CPU a bad label is a ValueError naming it; on a GPU
    the range check is a device-side assert (torch._assert_async, no host sync), as in
    F.cross_entropy. Every other argument is a ValueError naming it."""
    _check(hidden, weight, bias, targets, chunk_rows, ignore_index, reduction)
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, ignore_index, reduction)
