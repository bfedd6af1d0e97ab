"""FusedAdam: Adam / AdamW whose whole step is a few multi-tensor kernel launches.

    opt = FusedAdam(model.parameters(), lr=2e-4, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)

Drop-in for apex's and DeepSpeed's FusedAdam, with torch.optim.AdamW's math (adam_w_mode=True,
decoupled decay) or torch.optim.Adam's (adam_w_mode=False, L2 added to the gradient), and
torch.optim.AdamW's state_dict format, so a state saved by one loads into the other.

Kernels: csrc/adam/ (CUDA multi-tensor apply, CPU C++; the update functor adam.h is shared),
phi_kernels/triton/adam.py (pointer tables), phi_kernels/reference/adam.py (the oracle).
The C++ op is torch.ops.phi_kernels.adam_step (schema in csrc/ops.cpp); the "cuda-emu" backend
calls its twin torch.ops.phi_kernels_emu.adam_step (phi_kernels._simt: the CUDA kernel run on
CPU tensors by the SIMT emulator, for testing).

Per group, parameters are bucketed by (device, dtype, master weights, step); each bucket is one
call of the backend, which launches one kernel (or a few, as tables fill) for all its tensors.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from phi_kernels._backends import resolve_backend
from phi_kernels.reference.adam import adam_step_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    # torch.optim's messages, so code that matches them keeps working.
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class FusedAdam(torch.optim.Optimizer):
    """Adam / AdamW on fused multi-tensor kernels.

    Args beyond torch.optim.AdamW's:
      bias_correction: divide the moments by 1 - beta^step (as torch always does).
      adam_w_mode: decoupled weight decay (AdamW) if True, L2 regularisation (Adam) if False.
      master_weights: keep an fp32 copy of fp16/bf16 params (state "master_param"), updated by
        the kernel and rounded into the param in the same pass.
      capturable: lr (may be a tensor) and step live on the params' device and nothing syncs
        with the host during step(), so a CUDA graph can capture it.
      backend: "cuda", "cuda-emu", "triton", "cpu", "ref" (default: PHI_KERNELS_BACKEND, else the
        fastest; "cuda-emu" only when asked for).

    step(closure=None, *, grad_scale=None, found_inf=None): mixed-precision hooks. grad_scale
    (a one-element tensor, e.g. GradScaler's scale) divides the grads inside the kernel; when
    found_inf (e.g. from GradScaler) is > 0, or when grad_scale is given and a grad is not
    finite, the step is skipped: params, moments and step counts stay untouched.
    `last_step_skipped` tells whether the last step() was skipped (a host sync when read).
    """

    # torch.amp.GradScaler hands its scale and found_inf to optimizers that declare this
    # (as attributes grad_scale / found_inf) instead of unscaling the grads itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        master_weights: bool = False,
        capturable: bool = False,
        backend: str | None = None,
    ):
        _check_hparams(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        adam_w_mode=adam_w_mode, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        capturable=capturable)
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.backend = backend
        self._skipped: Tensor | bool = False
        for group in self.param_groups:
            _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for p in group["params"]:
                if p.dtype not in _DTYPES:
                    raise ValueError(f"FusedAdam supports float32, float16 and bfloat16 params, got {p.dtype}")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("bias_correction", True), ("adam_w_mode", True), ("amsgrad", False),
                               ("maximize", False), ("capturable", False)):
                group.setdefault(key, value)

    @property
    def last_step_skipped(self) -> bool:
        return bool(self._skipped)

    # ------------------------------------------------------------------ state

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if len(state) == 0 or "exp_avg" not in state:
            dev = p.device if group["capturable"] else "cpu"
            state["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.master_weights and p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().float().contiguous()
        # A state loaded from torch.optim.AdamW may hold moments in the param's dtype: the
        # kernels keep them in fp32, contiguous, on the param's device.
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
            t = state.get(key)
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device != p.device):
                state[key] = t.to(device=p.device, dtype=torch.float32).contiguous()
        if not isinstance(state["step"], Tensor):
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        want = p.device if group["capturable"] else torch.device("cpu")
        if state["step"].device != want or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(device=want, dtype=torch.float32)
        return state

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None and found_inf is None:  # set by torch.amp.GradScaler.step
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            self.grad_scale = self.found_inf = None

        buckets: dict[tuple, dict] = {}
        all_grads: list[Tensor] = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FusedAdam does not support sparse gradients; use torch.optim.SparseAdam")
                if p.grad.dtype != p.dtype or p.grad.shape != p.shape:
                    raise ValueError(f"a grad must match its param: param {p.dtype}{tuple(p.shape)}, "
                                     f"grad {p.grad.dtype}{tuple(p.grad.shape)}")
                if not p.is_contiguous():
                    raise ValueError(f"FusedAdam needs contiguous params, got strides {p.stride()}")
                state = self._init_state(p, group)
                step_key = None if group["capturable"] else float(state["step"])
                master = "master_param" in state
                key = (gi, p.device, p.dtype, master, step_key)
                b = buckets.setdefault(key, {"group": group, "params": [], "grads": [], "m": [], "v": [],
                                             "vmax": [], "master": [], "steps": []})
                b["params"].append(p)
                b["grads"].append(p.grad.contiguous())
                b["m"].append(state["exp_avg"])
                b["v"].append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    b["vmax"].append(state["max_exp_avg_sq"])
                if master:
                    b["master"].append(state["master_param"])
                b["steps"].append(state["step"])
                all_grads.append(p.grad)
        if not buckets:
            self._skipped = False
            return loss

        found_inf = self._combine_found_inf(found_inf, grad_scale, all_grads)
        if found_inf is not None and not any(g["capturable"] for g in self.param_groups):
            if float(found_inf.max()) > 0:  # one host sync, as GradScaler does
                self._skipped = True
                return loss
            found_inf = None
        self._skipped = found_inf if found_inf is not None else False

        for (gi, device, dtype, master, _), b in buckets.items():
            group = b["group"]
            beta1, beta2 = group["betas"]
            # step counts: one tensor per param (torch's format); every param of a bucket shares it.
            steps = b["steps"]
            if found_inf is None:
                torch._foreach_add_(steps, 1.0)
            else:  # capturable: advance only when the step is taken, without a sync
                torch._foreach_add_(steps, (found_inf.to(steps[0].device) <= 0).float().reshape(()))
            lr = group["lr"]
            lr_t = lr.to(device=device, dtype=torch.float32).reshape(()) if isinstance(lr, Tensor) else \
                torch.tensor(float(lr), dtype=torch.float32, device=steps[0].device)
            name = resolve_backend("FusedAdam", device, self.backend, why_not=lambda n: self._why_not(n, group))
            args = (b["params"], b["grads"], b["m"], b["v"], b["vmax"], b["master"], lr_t, steps[0], beta1, beta2,
                    group["eps"], group["weight_decay"], group["adam_w_mode"], group["bias_correction"],
                    group["maximize"], grad_scale, found_inf)
            if name == "ref":
                adam_step_ref(*args)
            elif name == "triton":
                from phi_kernels.triton.adam import adam_step_triton

                adam_step_triton(*args)
            elif name == "cuda-emu":
                torch.ops.phi_kernels_emu.adam_step(*args)
            else:
                torch.ops.phi_kernels.adam_step(*args)
        return loss

    @staticmethod
    def _why_not(backend: str, group: dict) -> str | None:
        # cuda-emu takes capturable: the emulated kernel reads lr / step / found_inf from
        # tensors, as on the GPU.
        if group["capturable"] and backend in ("cpu",):
            return "capturable needs device-side lr/step: use cuda, cuda-emu, triton or ref"
        return None

    @staticmethod
    def _combine_found_inf(found_inf: Tensor | None, grad_scale: Tensor | None, grads: list[Tensor]) -> Tensor | None:
        """The skip flag: the caller's found_inf, or, with grad_scale, whether any grad is not
        finite (max |g| over all grads, one multi-tensor pass; a NaN propagates through max)."""
        flags = []
        if found_inf is not None:
            flags.append(found_inf.float().reshape(()))
        if grad_scale is not None:
            norms = torch._foreach_norm(grads, math.inf)
            worst = torch.stack([n.to(grads[0].device).float() for n in norms]).max()
            flags.append((~torch.isfinite(worst)).float())
        if not flags:
            return None
        flag = flags[0]
        for f in flags[1:]:
            flag = torch.maximum(flag, f.to(flag.device))
        return flag.reshape(1)
