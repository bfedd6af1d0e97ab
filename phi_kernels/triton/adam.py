"""Adam / AdamW, Triton multi-tensor kernel. Math as csrc/adam/adam.h.

A launch covers every tensor of one param dtype in a param group: the host builds, per list
(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, master), a table of tensor addresses,
plus per program the tensor it works on and the chunk of it. Grid: one program per
(tensor, CHUNK-element chunk). Element offsets are 64-bit. Bias corrections: computed on the
host in double, or, when lr and step are device tensors (capturable), in the kernel in fp32.
A set found_inf flag masks every store, so a step with a non-finite grad changes nothing.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from phi_kernels.triton._interp import bf16_as_int16, to_storage

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _adam_kernel(
    P_TABLE, G_TABLE, M_TABLE, V_TABLE, VMAX_TABLE, MASTER_TABLE, NUMELS, BLOCK_TENSOR, BLOCK_CHUNK,
    LR_PTR, STEP_PTR, GRAD_SCALE_PTR, FOUND_INF_PTR,
    step_size, bc2_sqrt, decay, lr, inv_grad_scale, beta1, beta2, eps, weight_decay,
    P_DTYPE: tl.constexpr, ADAM_W: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    MASTER: tl.constexpr, DEVICE_SCALARS: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    HAS_GRAD_SCALE_PTR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BF16_AS_INT16: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)
    chunk = tl.load(BLOCK_CHUNK + pid).to(tl.int64)
    numel = tl.load(NUMELS + t)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < numel
    if HAS_FOUND_INF:  # a block-shaped flag (the interpreter cannot and a block with a scalar bool)
        mask = mask & ((tl.zeros([CHUNK], tl.float32) + tl.load(FOUND_INF_PTR)) == 0.0)
    if DEVICE_SCALARS:  # capturable: lr and step live on the device
        lr = tl.load(LR_PTR)
        step = tl.load(STEP_PTR)
        bc1 = 1.0
        bc2 = 1.0
        if BIAS_CORRECTION:
            bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
            bc2 = 1.0 - tl.exp2(step * tl.log2(beta2))
        step_size = lr / bc1
        bc2_sqrt = tl.sqrt(bc2)
        decay = 1.0 - lr * weight_decay
    if HAS_GRAD_SCALE_PTR:
        inv_grad_scale = 1.0 / tl.load(GRAD_SCALE_PTR)

    if BF16_AS_INT16:
        p_ptr = tl.load(P_TABLE + t).to(tl.pointer_type(tl.int16))
        g_ptr = tl.load(G_TABLE + t).to(tl.pointer_type(tl.int16))
    else:
        p_ptr = tl.load(P_TABLE + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(G_TABLE + t).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(M_TABLE + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(V_TABLE + t).to(tl.pointer_type(tl.float32))

    if BF16_AS_INT16:
        g = ((tl.load(g_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MASTER:
        w_ptr = tl.load(MASTER_TABLE + t).to(tl.pointer_type(tl.float32))
        p = tl.load(w_ptr + offs, mask=mask, other=0.0)
    elif BF16_AS_INT16:
        p = ((tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    g = g * inv_grad_scale
    if MAXIMIZE:
        g = -g
    if ADAM_W:
        p = p * decay
    else:
        g = g + weight_decay * p
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    vv = v
    if AMSGRAD:
        vmax_ptr = tl.load(VMAX_TABLE + t).to(tl.pointer_type(tl.float32))
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v)
        tl.store(vmax_ptr + offs, vmax, mask=mask)
        vv = vmax
    denom = tl.sqrt(vv) / bc2_sqrt + eps
    p = p - step_size * (m / denom)

    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, to_storage(p, P_DTYPE, BF16_AS_INT16), mask=mask)


# The launch configuration, shared by the launcher and aot_specs (the static report).
CHUNK = 2048  # elements per program
NUM_WARPS = 8  # 8 elements per thread: ~100 registers instead of ~200 at 4 warps (static report)


def _table(tensors, device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def adam_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, step, beta1, beta2, eps,
                     weight_decay, adam_w_mode, bias_correction, maximize, grad_scale=None, found_inf=None,
                     chunk: int = CHUNK) -> None:
    """Same contract as torch.ops.phi_kernels.adam_step_out; one launch for the whole list."""
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return
    pick = lambda xs: [xs[i] for i in keep] if xs else []  # noqa: E731
    params, grads, exp_avgs, exp_avg_sqs = pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs)
    max_exp_avg_sqs, masters = pick(max_exp_avg_sqs), pick(masters)
    dev = params[0].device
    numels = [p.numel() for p in params]
    n_chunks = [triton.cdiv(n, chunk) for n in numels]
    block_tensor = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), torch.tensor(n_chunks))
    block_chunk = torch.cat([torch.arange(c, dtype=torch.int32) for c in n_chunks])
    device_scalars = isinstance(lr, torch.Tensor) and lr.device.type == "cuda"
    if device_scalars:
        step_size = bc2_sqrt = decay = lr_f = 1.0
    else:
        lr_f, step_f = float(lr), float(step)
        bc1 = 1 - beta1**step_f if bias_correction else 1.0
        bc2 = 1 - beta2**step_f if bias_correction else 1.0
        step_size, bc2_sqrt, decay = lr_f / bc1, math.sqrt(bc2), 1 - lr_f * weight_decay
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    _adam_kernel[(len(block_tensor),)](
        _table(params, dev), _table(grads, dev), _table(exp_avgs, dev), _table(exp_avg_sqs, dev),
        _table(max_exp_avg_sqs, dev) if max_exp_avg_sqs else dummy, _table(masters, dev) if masters else dummy,
        torch.tensor(numels, dtype=torch.int64, device=dev), block_tensor.to(dev), block_chunk.to(dev),
        lr if device_scalars else dummy, step if device_scalars else dummy,
        grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
        step_size, bc2_sqrt, decay, lr_f,
        1.0 if grad_scale is None else (1.0 / float(grad_scale) if grad_scale.device.type == "cpu" else 1.0),
        beta1, beta2, eps, weight_decay,
        P_DTYPE=_TL_DTYPES[params[0].dtype], ADAM_W=adam_w_mode, AMSGRAD=bool(max_exp_avg_sqs),
        MAXIMIZE=maximize, MASTER=bool(masters), DEVICE_SCALARS=device_scalars, BIAS_CORRECTION=bias_correction,
        HAS_GRAD_SCALE_PTR=grad_scale is not None and grad_scale.device.type != "cpu",
        HAS_FOUND_INF=found_inf is not None, BF16_AS_INT16=bf16_as_int16(params[0]), CHUNK=chunk,
        num_warps=NUM_WARPS,
    )


def aot_specs():
    """phi-1.5 scale for the static report: one launch over 1.42e9 fp32 params (bf16 + master too)."""
    from phi_kernels.triton.aot import AotSpec

    n = 1_418_270_720
    specs = []
    for dt, master, nbytes in (("fp32", False, 28), ("bf16", True, 30)):
        sig = {name: "*i64" for name in ("P_TABLE", "G_TABLE", "M_TABLE", "V_TABLE", "VMAX_TABLE", "MASTER_TABLE",
                                         "NUMELS")}
        sig.update({"BLOCK_TENSOR": "*i32", "BLOCK_CHUNK": "*i32", "LR_PTR": "*fp32", "STEP_PTR": "*fp32",
                    "GRAD_SCALE_PTR": "*fp32", "FOUND_INF_PTR": "*fp32"})
        sig.update({k: "fp32" for k in ("step_size", "bc2_sqrt", "decay", "lr", "inv_grad_scale", "beta1", "beta2",
                                        "eps", "weight_decay")})
        consts = dict(P_DTYPE=tl.float32 if dt == "fp32" else tl.bfloat16, ADAM_W=True, AMSGRAD=False, MAXIMIZE=False,
                      MASTER=master, DEVICE_SCALARS=False, BIAS_CORRECTION=True, HAS_GRAD_SCALE_PTR=False,
                      HAS_FOUND_INF=True, BF16_AS_INT16=False, CHUNK=CHUNK)
        specs.append(AotSpec(f"adamw {dt}{' + fp32 master' if master else ''}", _adam_kernel, sig, consts,
                             num_warps=NUM_WARPS, flops=12.0 * n, min_bytes=float(nbytes) * n,
                             shape=f"{n / 1e9:.2f}B params ({nbytes} B/param)"))
    return specs
