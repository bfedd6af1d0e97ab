"""FusedAdam: Adam / AdamW whose whole step is a few multi-tensor kernel launches.

    opt = FusedAdam(model.parameters(), lr=2e-4, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)

Drop-in for apex's and DeepSpeed's FusedAdam, with torch.optim.AdamW's math (adam_w_mode=True,
decoupled decay) or torch.optim.Adam's (adam_w_mode=False, L2 added to the gradient), and
torch.optim.AdamW's state_dict format, so a state saved by one loads into the other.

Kernels: csrc/adam/ (CUDA multi-tensor apply, CPU C++; the update functor adam.h is shared),
phi_kernels/triton/adam.py (pointer tables), phi_kernels/reference/adam.py (the oracle).
The C++ op is torch.ops.phi_kernels.adam_step_out (schema in csrc/op_schemas.h); the "cuda-emu" backend
calls its twin torch.ops.phi_kernels_emu.adam_step_out (phi_kernels._simt: the CUDA kernel run on
CPU tensors by the SIMT emulator, for testing).

Per group, parameters are bucketed by (device, dtype, master weights, step); each bucket is one
call of the backend, which launches one kernel (or a few, as tables fill) for all its tensors.

Validate, then act: step() checks every group (hyper-parameters, params, grads, optimizer state,
the backend of every bucket, grad_scale / found_inf) before its first write to a param, a
moment, a step count or the state dict, so a step that raises changes nothing. The checks live
here, before dispatch, and are the same for every backend.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from phi_kernels._backends import BACKENDS, BackendUnavailableError, cpp_ops, resolve_backend
from phi_kernels.reference.adam import adam_step_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
_GROUP_FLAGS = ("bias_correction", "adam_w_mode", "amsgrad", "maximize", "capturable")
_MISSING = object()

try:
    import numpy as _np

    _BOOLS: tuple = (bool, _np.bool_)
except ImportError:  # pragma: no cover
    _BOOLS = (bool,)


# ----------------------------------------------------------------------------- checks
# Messages start as torch.optim's ("Invalid learning rate: ..."), so code that matches those keeps
# working, and then name the argument: "lr" for the constructor's, "param_groups[1]['lr']" for a
# group's.


def _key(where: str, key: str) -> str:
    return f"{where}[{key!r}]" if where else key


def _is_real(x) -> bool:
    """A real number that is not a bool (True as a learning rate is a slip, not 1.0)."""
    return isinstance(x, numbers.Real) and not isinstance(x, _BOOLS)


def _as_float(x) -> float:
    try:
        return float(x)
    except OverflowError:  # an int beyond float's range
        return math.inf


def _check_lr(lr, name: str, check_value: bool = True) -> None:
    what = "Invalid learning rate: "
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{what}{name} must be a one-element tensor, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"{what}{name} must be a floating-point tensor, got {lr.dtype}")
        if not check_value:
            return
        value = float(lr)
        shown = f"tensor {value}"
    elif _is_real(lr):
        value, shown = _as_float(lr), lr
    else:
        raise TypeError(f"{what}{name} must be a number or a one-element tensor, got {lr!r} ({type(lr).__name__})")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{what}{name} must be a finite number >= 0, got {shown}")


def _check_nonnegative(x, name: str, what: str) -> None:
    if not _is_real(x):
        raise TypeError(f"{what}{name} must be a number, got {x!r} ({type(x).__name__})")
    value = _as_float(x)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{what}{name} must be a finite number >= 0, got {x}")


def _check_betas(betas, name: str) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        what = f"Invalid beta parameter at index {i}: "
        if not _is_real(b):
            raise TypeError(f"{what}{name}[{i}] must be a number, got {b!r} ({type(b).__name__})")
        if not 0.0 <= _as_float(b) < 1.0:
            raise ValueError(f"{what}{name}[{i}] must be a number in [0, 1), got {b}")


def _check_hparams(lr, betas, eps, weight_decay, where: str = "", check_lr_value: bool = True) -> None:
    """torch.optim.AdamW's rules and more: lr (a number or a one-element float tensor) finite and
    >= 0, 0 <= beta < 1, eps and weight_decay finite and >= 0."""
    _check_lr(lr, _key(where, "lr"), check_lr_value)
    _check_nonnegative(eps, _key(where, "eps"), "Invalid epsilon value: ")
    _check_betas(betas, _key(where, "betas"))
    _check_nonnegative(weight_decay, _key(where, "weight_decay"), "Invalid weight_decay value: ")


def _check_flag(value, name: str) -> None:
    # A tuple here is the classic slip of passing torch.optim.AdamW's positional order
    # (params, lr, betas, ...) to apex's (params, lr, bias_correction, betas, ...).
    if not (isinstance(value, _BOOLS) or (type(value) is int and value in (0, 1))):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _check_amp_tensor(t, name: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a one-element tensor (as torch.amp.GradScaler passes), got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor, got shape {tuple(t.shape)}")
    ok = t.is_floating_point() or (name == "found_inf" and t.dtype == torch.bool)
    if not ok:
        kinds = "floating-point or bool" if name == "found_inf" else "floating-point"
        raise TypeError(f"{name} must be a {kinds} tensor, got {t.dtype}")


def _pname(gi: int, j: int) -> str:
    return f"param_groups[{gi}]['params'][{j}]"


def _param_of(entry):
    """A group's entry: a Tensor, or (name, Tensor) as torch.optim accepts."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
        return entry[1]
    return entry


def _check_no_overlap(named: list[tuple[str, Tensor]]) -> None:
    """Params are updated in place: two params sharing memory would update it twice."""
    spans = []
    for name, p in named:
        if p.numel() == 0 or p.device.type == "meta":
            continue
        start = p.data_ptr()
        spans.append((str(p.device), start, start + p.numel() * p.element_size(), name))
    spans.sort(key=lambda s: (s[0], s[1]))
    for a, b in zip(spans, spans[1:]):  # an overlapping pair implies an overlapping neighbour pair
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"{b[3]} overlaps {a[3]} in memory: FusedAdam updates params in place, so the "
                             "shared elements would be updated twice; pass each tensor once")


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

    Rules, checked in the constructor, in add_param_group and again by every step() (schedulers
    assign group["lr"]), with the argument and the group index in the message: lr a finite
    number >= 0 or a one-element floating-point tensor holding one (a capturable group's lr
    tensor on the GPU is value-checked when added, not in step(), which must not sync);
    0 <= beta1, beta2 < 1; eps and weight_decay finite and >= 0; the flags bools; params
    float32 / float16 / bfloat16, contiguous, each at most once in the whole optimizer and not
    overlapping another in memory. step() checks grads (dense, the param's dtype, shape and
    device), the optimizer state's shapes, each bucket's backend and grad_scale / found_inf
    before anything is written: a step that raises leaves params, state and step counts as they
    were, and creates no state.

    step(closure=None, *, grad_scale=None, found_inf=None): mixed-precision hooks. grad_scale
    (a one-element floating-point tensor, e.g. GradScaler's scale) divides the grads inside the
    kernel. The step is skipped (params, moments and step counts stay untouched,
    `last_step_skipped` is True) when found_inf (a one-element tensor, e.g. from GradScaler) is
    > 0 or NaN, when grad_scale is <= 0 or not finite, or when grad_scale is given and a grad is
    not finite. `last_step_skipped` tells whether the last step() was skipped (a host sync when read).
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
        for name, value in (("bias_correction", bias_correction), ("adam_w_mode", adam_w_mode),
                            ("amsgrad", amsgrad), ("maximize", maximize), ("master_weights", master_weights),
                            ("capturable", capturable)):
            _check_flag(value, name)
        if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        adam_w_mode=adam_w_mode, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        capturable=capturable)
        super().__init__(params, defaults)  # each group through add_param_group, which checks it
        self.master_weights = master_weights
        self.backend = backend
        self._skipped: Tensor | bool = False

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("bias_correction", True), ("adam_w_mode", True), ("amsgrad", False),
                               ("maximize", False), ("capturable", False)):
                group.setdefault(key, value)

    @property
    def last_step_skipped(self) -> bool:
        return bool(self._skipped)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group after FusedAdam's checks: the group's hyper-parameters (torch
        checks only the constructor's), its params' dtype and layout, and no param twice (in this
        group or another) or overlapping another in memory. Nothing is added when a check fails."""
        if isinstance(param_group, dict) and "params" in param_group:
            params = param_group["params"]
            if not isinstance(params, (Tensor, set)):  # a set: torch's own error follows
                param_group["params"] = params = list(params)  # as torch does: an iterator is read once
            if not isinstance(params, set):
                params = [params] if isinstance(params, Tensor) else params
                gi = len(self.param_groups)
                merged = {**self.defaults, **param_group}
                self._check_group_hparams(merged, gi, check_lr_value=True)
                seen = {id(p): (i, j) for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])}
                named = [(_pname(i, j), p) for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])]
                for j, entry in enumerate(params):
                    p = _param_of(entry)
                    self._check_param(p, gi, j, seen)
                    named.append((_pname(gi, j), p))
                _check_no_overlap(named)
        super().add_param_group(param_group)

    @staticmethod
    def _check_group_hparams(group: dict, gi: int, check_lr_value: bool) -> None:
        where = f"param_groups[{gi}]"
        for key in ("lr", "betas", "eps", "weight_decay") + _GROUP_FLAGS:
            if key not in group:
                raise ValueError(f"{where} has no {key!r}")
        lr = group["lr"]
        if isinstance(lr, Tensor) and group["capturable"] and lr.device.type != "cpu":
            check_lr_value = False  # reading it would sync with the device (checked when the group was added)
        _check_hparams(lr, group["betas"], group["eps"], group["weight_decay"], where, check_lr_value)
        for key in _GROUP_FLAGS:
            _check_flag(group[key], _key(where, key))

    @staticmethod
    def _check_param(p, gi: int, j: int, seen: dict[int, tuple[int, int]]) -> None:
        """A param's dtype and layout, and that it was not seen before (seen: id -> (group, index))."""
        if not isinstance(p, Tensor):
            name = _pname(gi, j)
            raise TypeError(f"optimizer can only optimize Tensors, but {name} is {torch.typename(p)}")
        if p.dtype not in _DTYPES:
            name = _pname(gi, j)
            raise ValueError(f"FusedAdam supports float32, float16 and bfloat16 params, got {p.dtype} for {name}")
        if not p.is_contiguous():
            name = _pname(gi, j)
            raise ValueError(f"FusedAdam needs contiguous params: {name} has shape {tuple(p.shape)} and strides "
                             f"{p.stride()}")
        other = seen.get(id(p))
        if other is not None:
            name, first = _pname(gi, j), _pname(*other)
            if other[0] == gi:
                raise ValueError(f"a parameter appears twice in one parameter group: {name} is {first} "
                                 "(it would be updated twice per step)")
            raise ValueError(f"some parameters appear in more than one parameter group: {name} is {first}")
        seen[id(p)] = (gi, j)

    # ------------------------------------------------------------------ state

    @staticmethod
    def _check_state(state: dict | None, p: Tensor, gi: int, j: int) -> None:
        """An existing state (e.g. loaded by load_state_dict, which checks no shapes) must fit its param."""
        if not state or "exp_avg" not in state:
            return  # (re)initialised by _init_state
        if "exp_avg_sq" not in state:
            raise ValueError(f"optimizer state of {_pname(gi, j)} has exp_avg but no exp_avg_sq")
        for key in _STATE_TENSORS:
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.shape != p.shape or not t.is_floating_point():
                got = f"{t.dtype}{tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"optimizer state of {_pname(gi, j)}: {key} must be a floating-point tensor of the "
                                 f"param's shape {tuple(p.shape)}, got {got}")
        if "master_param" in state and p.dtype == torch.float32:
            raise ValueError(f"optimizer state of {_pname(gi, j)} holds a master_param, but the param is float32 "
                             "(master weights are for float16 / bfloat16 params)")
        step = state.get("step")
        if not (isinstance(step, Tensor) and step.numel() == 1 and step.is_floating_point()) and not _is_real(step):
            raise ValueError(f"optimizer state of {_pname(gi, j)}: step must be a number or a one-element float "
                             f"tensor, got {step!r}")

    def _init_state(self, p: Tensor, group: dict, journal: list) -> dict:
        """The param's state, created or completed (moments, master copy) and normalised (fp32,
        contiguous, on the param's device; step a 0-d fp32 tensor). Every change is recorded in
        `journal` first, so that step() can undo them all if a later one fails."""
        if p not in self.state:
            journal.append((None, p, None))
        state = self.state[p]

        def put(key, value):  # only called when something changes: rare after the first step
            journal.append((state, key, state.get(key, _MISSING)))
            state[key] = value

        if len(state) == 0 or "exp_avg" not in state:
            dev = p.device if group["capturable"] else "cpu"
            put("step", torch.zeros((), dtype=torch.float32, device=dev))
            put("exp_avg", torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format))
            put("exp_avg_sq", torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format))
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            put("max_exp_avg_sq", torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format))
        if self.master_weights and p.dtype != torch.float32 and "master_param" not in state:
            put("master_param", p.detach().float().contiguous())
        # A state loaded from torch.optim.AdamW may hold moments in the param's dtype: the
        # kernels keep them in fp32, contiguous, on the param's device.
        for key in _STATE_TENSORS:
            t = state.get(key)
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device != p.device):
                put(key, t.to(device=p.device, dtype=torch.float32).contiguous())
        step = state["step"]
        if not isinstance(step, Tensor):
            step = torch.tensor(float(step), dtype=torch.float32)
        want = p.device if group["capturable"] else torch.device("cpu")
        if step.device != want or step.dtype != torch.float32 or step.dim() != 0:
            step = step.to(device=want, dtype=torch.float32).reshape(())
        if step is not state["step"]:
            put("step", step)
        return state

    def _undo(self, journal: list) -> None:
        for state, key, old in reversed(journal):
            if state is None:
                self.state.pop(key, None)
            elif old is _MISSING:
                state.pop(key, None)
            else:
                state[key] = old

    # ------------------------------------------------------------------ step

    def _validate(self, grad_scale, found_inf) -> tuple[list, dict]:
        """Every check of a step, no writes. Returns [(group index, group, param)] for the params
        with a grad and {(group index, device): backend name}."""
        _check_amp_tensor(grad_scale, "grad_scale")
        _check_amp_tensor(found_inf, "found_inf")
        work, backends, seen = [], {}, {}
        for gi, group in enumerate(self.param_groups):
            self._check_group_hparams(group, gi, check_lr_value=True)
            for j, p in enumerate(group["params"]):
                self._check_param(p, gi, j, seen)
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    self._refuse_grad(p, g, _pname(gi, j))
                state = self.state.get(p)  # .get: the defaultdict must not grow an entry here
                self._check_state(state, p, gi, j)
                if (gi, p.device) not in backends:
                    try:
                        backends[(gi, p.device)] = resolve_backend(
                            "FusedAdam", p.device, self.backend, why_not=lambda n, grp=group: self._why_not(n, grp))
                    except (BackendUnavailableError, ValueError) as e:
                        raise type(e)(f"{e} (param_groups[{gi}], {p.device.type} params)") from None
                work.append((gi, group, p))
        return work, backends

    @staticmethod
    def _refuse_grad(p: Tensor, g: Tensor, name: str) -> None:
        if g.layout != torch.strided:
            raise ValueError(f"FusedAdam does not support sparse gradients ({name}.grad is {g.layout}); "
                             "use torch.optim.SparseAdam")
        if g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"a grad must match its param: {name} is {p.dtype}{tuple(p.shape)}, "
                             f"its grad {g.dtype}{tuple(g.shape)}")
        raise ValueError(f"{name}.grad is on {g.device}, the param on {p.device}")

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

        # 1. Validate everything. Nothing is written before this returns.
        work, backends = self._validate(grad_scale, found_inf)
        if not work:
            self._skipped = False
            return loss

        # 2. Skip decision. The skip flag is 0 or 1, so every backend reads it alike.
        capturable = any(g["capturable"] for g in self.param_groups)
        flag = self._combine_found_inf(found_inf, grad_scale, [p.grad for _, _, p in work])
        if flag is not None and not capturable:
            if float(flag) > 0:  # one host sync, as GradScaler does
                self._skipped = True
                return loss
            flag = None
        self._skipped = flag if flag is not None else False
        if grad_scale is not None:  # a bad scale skips the step; the kernels must still not divide by it
            gs = grad_scale.to(torch.float32).reshape(1)
            grad_scale = torch.where(torch.isfinite(gs) & (gs > 0), gs, torch.ones_like(gs))

        # 3. Lazy state, bucketed; undone if anything here fails (e.g. out of memory).
        buckets: dict[tuple, dict] = {}
        journal: list = []
        try:
            for gi, group, p in work:
                state = self._init_state(p, group, journal)
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
        except BaseException:
            self._undo(journal)
            raise

        # 4. Act: one backend call per bucket; a bucket's step counts advance after its kernel.
        for (gi, device, dtype, master, _), b in buckets.items():
            group = b["group"]
            beta1, beta2 = group["betas"]
            # step counts: one tensor per param (torch's format); every param of a bucket shares it.
            steps = b["steps"]
            flag_b = None if flag is None else flag.to(device)
            inc = 1.0 if flag_b is None else (flag_b.to(steps[0].device) <= 0).float().reshape(())
            # The kernel's step is the taken step's count even when the flag skips it (then unread):
            # a first skipped step must not show it 0, where 1 - beta^0 = 0 divides by zero.
            step_now = steps[0] + 1.0
            lr = group["lr"]
            lr_t = lr.to(device=device, dtype=torch.float32).reshape(()) if isinstance(lr, Tensor) else \
                torch.tensor(float(lr), dtype=torch.float32, device=steps[0].device)
            gs_b = grad_scale if grad_scale is None or grad_scale.device.type == "cpu" else grad_scale.to(device)
            name = backends[(gi, device)]
            args = (b["params"], b["grads"], b["m"], b["v"], b["vmax"], b["master"], lr_t, step_now,
                    float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                    bool(group["adam_w_mode"]), bool(group["bias_correction"]), bool(group["maximize"]), gs_b, flag_b)
            if name == "ref":
                adam_step_ref(*args)
            elif name == "triton":
                from phi_kernels.triton.adam import adam_step_triton

                adam_step_triton(*args)
            else:  # "cpu", "cuda" or "cuda-emu": the C++ op
                cpp_ops(name).adam_step_out(*args)
            torch._foreach_add_(steps, inc)
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
        """The skip flag, 0.0 or 1.0 (shape (1,)): 1 when the caller's found_inf is > 0 or NaN, or,
        with grad_scale, when the scale is <= 0 or not finite or a grad is not finite (max |g| over
        all grads, one multi-tensor pass; a NaN propagates through max)."""
        flags = []
        if found_inf is not None:
            f = found_inf.to(torch.float32).reshape(())
            flags.append((~(f <= 0)).float())  # NaN counts as found
        if grad_scale is not None:
            s = grad_scale.to(torch.float32).reshape(())
            flags.append((~(torch.isfinite(s) & (s > 0))).float())
            norms = torch._foreach_norm(grads, math.inf)
            worst = torch.stack([n.to(grads[0].device).float() for n in norms]).max()
            flags.append((~torch.isfinite(worst)).float())
        if not flags:
            return None
        flag = flags[0]
        for f in flags[1:]:
            flag = torch.maximum(flag, f.to(flag.device))
        return flag.reshape(1)
