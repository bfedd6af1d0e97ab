"""FusedAdam against torch.optim.AdamW / Adam (the external oracle) and the fp32 reference,
over many shapes in one group, every option, every param dtype and every backend."""
from __future__ import annotations

import pytest
import torch

from phi_kernels import FusedAdam
from tests.conftest import DEVICE, kernel_backend, kernel_backends

SHAPES = [(), (1,), (7,), (4097,), (65537,), (33, 65)]  # 65537 straddles two 64K-element chunks
SMALL_SHAPES = [(), (1,), (7,), (4097,), (33, 65)]  # for the Triton interpreter (slow)
KW = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-7)


def _interpreting(backend):
    return backend == "triton" and DEVICE == "cpu"


def _work(backend, steps):
    """(shapes, steps) of a test that runs `steps` steps over SHAPES. The Triton interpreter gets
    less work; cuda-emu (the CUDA kernel in the SIMT emulator) is fast enough for all of it."""
    if _interpreting(backend):
        return SMALL_SHAPES, min(steps, 8)
    return SHAPES, steps


def _train(make_opt, shapes, steps, dtype=torch.float32, grad_dtype=None, seed=0):
    """Run `steps` optimizer steps with fresh random grads; return the params."""
    torch.manual_seed(seed)
    params = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, grad_dtype or dtype)
        opt.step()
    return [p.detach() for p in params], opt


def _close(ours, theirs, rtol=1e-6, atol=1e-7):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", kernel_backends() + ["ref"])
@pytest.mark.parametrize("adam_w_mode", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
def test_fp32_matches_torch(backend, adam_w_mode, amsgrad, maximize):
    shapes, steps = _work(backend, 50)
    wd = 0.1
    torch_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    theirs, _ = _train(lambda ps: torch_cls(ps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, fused=True, **KW),
                       shapes, steps)
    ours, opt = _train(lambda ps: FusedAdam(ps, weight_decay=wd, adam_w_mode=adam_w_mode, amsgrad=amsgrad,
                                            maximize=maximize, backend=backend, **KW), shapes, steps)
    _close(ours, theirs)
    assert all(float(opt.state[p]["step"]) == steps for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("backend", kernel_backends() + ["ref"])
def test_no_bias_correction_and_groups(backend):
    """bias_correction=False has no torch counterpart: the fp64 reference math is the oracle.
    Two param groups with their own hyperparameters; a param without grad is left alone."""
    steps = 5 if _interpreting(backend) else 20

    def make(ps):
        return FusedAdam([{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.0},
                          {"params": ps[2:], "betas": (0.8, 0.9)}], bias_correction=False, backend=backend, **KW)

    def make_ref(ps):
        return FusedAdam([{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.0},
                          {"params": ps[2:], "betas": (0.8, 0.9)}], bias_correction=False, backend="ref", **KW)

    ours, _ = _train(make, SMALL_SHAPES, steps)
    ref, _ = _train(make_ref, SMALL_SHAPES, steps)
    _close(ours, ref)
    # Independent check of one element after one step with bias_correction=False:
    # p1 = p0 - lr * m1 / (sqrt(v1) + eps), m1 = (1 - b1) g, v1 = (1 - b2) g^2.
    p = torch.tensor([2.0], device=DEVICE, requires_grad=True)
    frozen = torch.tensor([5.0], device=DEVICE, requires_grad=True)
    opt = FusedAdam([p, frozen], lr=0.1, betas=(0.5, 0.75), eps=0.0, bias_correction=False, backend=backend)
    p.grad = torch.tensor([4.0], device=DEVICE)
    opt.step()
    expect = 2.0 - 0.1 * (0.5 * 4.0) / (0.25 * 16.0) ** 0.5
    assert abs(float(p.detach()) - expect) < 1e-6
    assert float(frozen.detach()) == 5.0 and frozen not in opt.state


@pytest.mark.parametrize("backend", kernel_backends() + ["ref"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_master_weights_follow_fp32_torch(backend, dtype):
    """With master weights the fp32 copy follows torch's fp32 AdamW given the same (16-bit) grads,
    and the 16-bit param is that copy rounded."""
    shapes, steps = (SMALL_SHAPES, 6) if _interpreting(backend) else _work(backend, 50)
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]
    shadow = [p.detach().float().clone().requires_grad_() for p in params]
    ours = FusedAdam(params, weight_decay=0.1, master_weights=True, backend=backend, **KW)
    theirs = torch.optim.AdamW(shadow, weight_decay=0.1, **KW)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p, s in zip(params, shadow):
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, dtype)
            s.grad = p.grad.float()
        ours.step()
        theirs.step()
    for p, s in zip(params, shadow):
        master = ours.state[p]["master_param"]
        torch.testing.assert_close(master, s.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), master.to(dtype))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_params_match_reference(backend, dtype):
    """No master weights: fp32 math and state, param rounded each step; same as the reference."""
    steps = 5 if _interpreting(backend) else 30
    ours, _ = _train(lambda ps: FusedAdam(ps, weight_decay=0.1, backend=backend, **KW), SMALL_SHAPES, steps, dtype)
    ref, _ = _train(lambda ps: FusedAdam(ps, weight_decay=0.1, backend="ref", **KW), SMALL_SHAPES, steps, dtype)
    for a, b in zip(ours, ref):  # identical fp32 math -> identical rounding, up to fp32 FMA contraction
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("backend", kernel_backends() + ["ref"])
def test_nonfinite_grad_skips_step(backend):
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE).requires_grad_() for s in [(5,), (3, 4)]]
    opt = FusedAdam(params, backend=backend, **KW)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    params[1].grad = torch.randn_like(params[1])
    params[1].grad[1, 2] = float("nan")
    opt.step(grad_scale=torch.tensor(1024.0, device=DEVICE))
    assert opt.last_step_skipped
    for b, p in zip(before, params):
        assert torch.equal(b, p.detach())
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, state_before[k]), k
    # found_inf from the caller (e.g. GradScaler) skips too; a clean step afterwards is taken.
    params[1].grad = torch.randn_like(params[1])
    opt.step(found_inf=torch.ones(1, device=DEVICE))
    assert opt.last_step_skipped and torch.equal(before[0], params[0].detach())
    opt.step(grad_scale=torch.tensor(2.0, device=DEVICE))
    assert not opt.last_step_skipped and not torch.equal(before[0], params[0].detach())
    assert float(opt.state[params[0]]["step"]) == 2


@pytest.mark.parametrize("backend", kernel_backends() + ["ref"])
def test_grad_scale_unscales_inside_the_kernel(backend):
    ours, _ = _train(lambda ps: FusedAdam(ps, backend=backend, **KW), [(7,), (130,)], 3)
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE).requires_grad_() for s in [(7,), (130,)]]
    opt = FusedAdam(params, backend=backend, **KW)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE) * 256.0
        opt.step(grad_scale=torch.tensor(256.0, device=DEVICE))
    _close([p.detach() for p in params], ours)


def test_composes_with_grad_scaler():
    """torch.amp.GradScaler drives FusedAdam like torch's fused AdamW (scale/found_inf attributes)."""
    def run(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4).to(DEVICE)
        opt = make_opt(model.parameters())
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
        for i in range(6):
            x = torch.randn(8, 16, device=DEVICE)
            loss = model(x).square().mean() * (float("inf") if i == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], scaler.get_scale()

    # weight_decay explicit: torch's AdamW defaults to 0.01, apex/DeepSpeed FusedAdam (and ours) to 0.
    theirs, scale_t = run(lambda ps: torch.optim.AdamW(ps, fused=True, weight_decay=0.01, **KW))
    ours, scale_o = run(lambda ps: FusedAdam(ps, weight_decay=0.01, **KW))
    assert scale_t == scale_o
    _close(ours, theirs)


# ----------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip_with_torch(direction):
    def build(cls, params, **kw):
        return cls(params, weight_decay=0.1, **kw, **KW) if cls is torch.optim.AdamW else \
            cls(params, weight_decay=0.1, **KW)

    first, second = (torch.optim.AdamW, FusedAdam) if direction == "torch_to_ours" else (FusedAdam, torch.optim.AdamW)
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE).requires_grad_() for s in [(5,), (4, 3)]]
    straight = [p.detach().clone().requires_grad_() for p in params]
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=g).to(DEVICE) for p in params] for _ in range(10)]

    opt_a = build(first, params)
    for gs in grads[:5]:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt_a.step()
    opt_b = build(second, params)
    opt_b.load_state_dict(opt_a.state_dict())
    for gs in grads[5:]:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt_b.step()

    ref = torch.optim.AdamW(straight, weight_decay=0.1, **KW)
    for gs in grads:
        for p, gr in zip(straight, gs):
            p.grad = gr.clone()
        ref.step()
    _close([p.detach() for p in params], [p.detach() for p in straight])
    assert set(opt_b.state_dict()["state"][0]) >= {"step", "exp_avg", "exp_avg_sq"}


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(eps=-1e-8), "Invalid epsilon"),
    (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdam([torch.zeros(3, requires_grad=True)], **kwargs)


def test_sparse_grad_and_bad_dtype():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        FusedAdam(emb.parameters()).step()
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        FusedAdam([torch.zeros(3, dtype=torch.float64, requires_grad=True)])


def test_cuda_adam_kernels_compiled_without_spills():
    from phi_kernels import inspect as pk_inspect

    if not pk_inspect.extension_has_cuda():
        pytest.skip("phi_kernels._C was built without CUDA kernels")
    kernels = [k for k in pk_inspect.cuda_kernels() if "adam_kernel" in k.name]
    assert {k.arch for k in kernels} >= {"sm_80", "sm_90a"}
    assert len(kernels) == 2 * 3 * 4, "3 dtypes x (amsgrad, master) variants x 2 archs"
    for k in kernels:
        assert k.spill_bytes == 0 and k.ldl_stl == 0, k


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.values[0] != "cpu"] + ["ref"])
def test_capturable_matches_and_skips_without_advancing(backend):
    """capturable=True: step counts live on the params' device and advance only for steps that
    are taken (found_inf is applied on the device); results equal the non-capturable path."""
    plain, _ = _train(lambda ps: FusedAdam(ps, weight_decay=0.1, backend=backend, **KW), SMALL_SHAPES, 4)
    ours, opt = _train(lambda ps: FusedAdam(ps, weight_decay=0.1, capturable=True, backend=backend, **KW),
                       SMALL_SHAPES, 4)
    _close(ours, plain)
    p = opt.param_groups[0]["params"][2]
    assert opt.state[p]["step"].device == p.device and float(opt.state[p]["step"]) == 4
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step(found_inf=torch.ones(1, device=DEVICE))
    assert torch.equal(before, p.detach()) and float(opt.state[p]["step"]) == 4


@pytest.mark.parametrize("backend", [kernel_backend("cuda"), kernel_backend("cuda-emu")])
def test_more_tensors_than_one_multi_tensor_table(backend):
    """30 tensors in one group: the CUDA launch fills a table (24 tensors, 320 blocks) and starts
    another. Tensor 23, the 24th, spans two 64K-element chunks, so the table fills on its last
    chunk; an empty tensor is skipped. Checked against torch.optim.AdamW."""
    shapes = [(1 + 37 * i,) for i in range(30)]
    shapes[9], shapes[23] = (0,), (70001,)
    theirs, _ = _train(lambda ps: torch.optim.AdamW(ps, weight_decay=0.1, fused=True, **KW), shapes, 3)
    ours, opt = _train(lambda ps: FusedAdam(ps, weight_decay=0.1, backend=backend, **KW), shapes, 3)
    _close(ours, theirs)
    assert all(float(opt.state[p]["step"]) == 3 for p in opt.param_groups[0]["params"])


def test_capturable_rejects_the_cpu_kernel():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(Exception, match="capturable"):
        FusedAdam([p], capturable=True, backend="cpu").step()
