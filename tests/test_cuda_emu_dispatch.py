"""The "cuda-emu" backend end to end: each public op routes backend="cuda-emu" to its
phi_kernels_emu op (the CUDA C++ kernels run on CPU tensors by the SIMT emulator of
phi_kernels._simt) and matches the reference; flash attention refuses what the CUDA kernels
refuse, with the cuda backend's reasons. (The full case lists run on cuda-emu in the op test
files; this file checks the wiring.)"""
from __future__ import annotations

import re

import pytest
import torch

from phi_kernels import (BackendUnavailableError, FusedAdam, apply_rotary, backend_status, flash_attn_func,
                         rotary_cos_sin)
from phi_kernels.flash_attn import FlashAttnArgs

_STATUS = backend_status("cuda-emu", "cpu")
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"cuda-emu: {_STATUS.reason}")


def _qkv(dtype=torch.float16, head_dim=64, seqlen=70, heads=2):
    return [torch.randn(1, seqlen, heads, head_dim).to(dtype).requires_grad_() for _ in range(3)]


def test_flash_attn_forward_backward_match_reference():
    q, k, v = _qkv()
    out = flash_attn_func(q, k, v, causal=True, backend="cuda-emu")
    ref = flash_attn_func(q, k, v, causal=True, backend="ref")
    assert out.dtype == torch.float16 and out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and torch.isfinite(g).all(), f"d{name}"
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=0, msg=f"d{name}")


@pytest.mark.parametrize("dtype,head_dim,reason", [
    (torch.float32, 64, "dtype torch.float32 (the CUDA kernels take float16 and bfloat16)"),
    (torch.float16, 80, "head_dim 80 (the CUDA kernels are compiled for 64 and 128)"),
], ids=["float32", "head_dim80"])
def test_flash_attn_refuses_what_the_cuda_kernels_refuse(dtype, head_dim, reason):
    q, k, v = _qkv(dtype, head_dim, seqlen=8)
    with pytest.raises(BackendUnavailableError, match=r"'cuda-emu' \(backend=\) cannot run this call: "
                                                      + re.escape(reason)):
        flash_attn_func(q, k, v, causal=True, backend="cuda-emu")
    # The same reason the cuda backend gives (phi_kernels/flash_attn.py: one check for both).
    from phi_kernels.flash_attn import _why_not_cuda

    assert _why_not_cuda(q, k, v, False, emulated=True) == reason


def test_flash_attn_deterministic_refused_like_cuda():
    q, k, v = _qkv(seqlen=8)
    with pytest.raises(BackendUnavailableError, match="deterministic=True"):
        flash_attn_func(q, k, v, causal=True, deterministic=True, backend="cuda-emu")


@pytest.mark.parametrize("name,make,match", [
    ("head_dim 80", lambda: (torch.randn(1, 8, 2, 80).half(),) * 3, "head_dim 80"),
    ("float32", lambda: (torch.randn(1, 8, 2, 64),) * 3, "float32"),
    ("misaligned rows", lambda: (torch.randn(1 * 8 * 2 * 64 + 1).half()[1:].view(1, 8, 2, 64),) * 3, "16-byte aligned"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_emulated_op_itself_refuses_like_the_cuda_host_code(name, make, match):
    """Called directly (past the Python checks), the emulated op refuses with the CUDA host
    code's messages (as phi_kernels::flash_attn_cuda_plan does in tests/test_flash_attn.py)."""
    q, k, v = make()
    out, lse = torch.empty(q.shape, dtype=q.dtype), torch.empty(1, 2, 8)
    with pytest.raises(RuntimeError, match=match):
        options = FlashAttnArgs(max_seqlen_q=8, max_seqlen_k=8, softmax_scale=0.125, window_right=0)
        torch.ops.phi_kernels_emu.flash_attn_forward_out(q, k, v, *options.positional(), out, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_matches_reference(dtype):
    x = torch.randn(2, 9, 3, 64).to(dtype)
    cos, sin = rotary_cos_sin(16, 32, dtype=dtype)
    out = apply_rotary(x, cos, sin, seqlen_offsets=3, backend="cuda-emu")
    ref = apply_rotary(x, cos, sin, seqlen_offsets=3, backend="ref")
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # Autograd goes through the emulated op too (the conjugate rotation).
    xg = x.float().requires_grad_()
    cos32, sin32 = cos.float(), sin.float()
    apply_rotary(xg, cos32, sin32, backend="cuda-emu").square().sum().backward()
    xr = x.float().requires_grad_()
    apply_rotary(xr, cos32, sin32, backend="ref").square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capturable", [False, True], ids=["", "capturable"])
def test_fused_adam_matches_reference(capturable):
    def run(backend):
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_() for s in [(5,), (3, 7), (300,)]]
        opt = FusedAdam(params, lr=1e-2, weight_decay=0.1, capturable=capturable, backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run("cuda-emu"), run("ref")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- emulator knobs


def test_sm86_refuses_the_head_dim_128_backward_and_dispatch_knows(monkeypatch):
    """The sm_80 binary also runs on sm_86 / sm_89 (99 KiB of shared memory per block): the
    head_dim 128 backward (112 KiB) cannot launch there. The host code refuses it with the
    reason, and the dispatcher knows before launching (auto-dispatch on such a GPU then picks
    triton); head_dim 64 and the head_dim 128 forward still run."""
    from phi_kernels.flash_attn import _why_not_cuda

    monkeypatch.setenv("PHI_SIMT_ARCH", "sm_86")
    q, k, v = _qkv(head_dim=128, seqlen=16)
    reason = _why_not_cuda(q, k, v, False, emulated=True, backward=True)
    assert reason is not None and "backward needs 114688 bytes of shared memory per block" in reason, reason
    assert "allows 101376" in reason
    with pytest.raises(BackendUnavailableError, match="114688 bytes of shared memory"):
        flash_attn_func(q, k, v, causal=True, backend="cuda-emu")
    with torch.no_grad():  # inference needs only the forward (48 KiB)
        out = flash_attn_func(q, k, v, causal=True, backend="cuda-emu")
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True, backend="ref").detach(), atol=2e-3, rtol=0)
    # The C++ host code refuses the launch itself when called directly.
    qd, kd, vd = (t.detach() for t in (q, k, v))
    lse = torch.empty(1, 2, 16)
    dq, dk, dv = (torch.empty_like(t) for t in (qd, kd, vd))
    with pytest.raises(RuntimeError, match="backward needs 114688 bytes of shared memory per block, this GPU allows"):
        options = FlashAttnArgs(max_seqlen_q=16, max_seqlen_k=16, softmax_scale=0.125, window_right=0)
        torch.ops.phi_kernels_emu.flash_attn_backward_out(qd, qd, kd, vd, qd, lse, *options.positional(), dq, dk, dv)
    q64, k64, v64 = _qkv(head_dim=64, seqlen=16)
    assert _why_not_cuda(q64, k64, v64, False, emulated=True, backward=True) is None
    monkeypatch.setenv("PHI_SIMT_ARCH", "sm_90")
    assert _why_not_cuda(q, k, v, False, emulated=True, backward=True) is None
    monkeypatch.setenv("PHI_SIMT_ARCH", "sm_75")
    with pytest.raises(RuntimeError, match="PHI_SIMT_ARCH=sm_75 is not an emulated arch"):
        torch.ops.phi_kernels_emu.emu_max_dynamic_smem()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_warp_schedules_do_not_change_the_answer(monkeypatch, seed):
    """PHI_SIMT_SEED shuffles the order in which the emulator runs warps and lanes between
    barriers: a kernel with a missing barrier would change its answer or trip the race
    detector; ours give the seed-0 result (up to the order of dq's float atomics)."""
    q, k, v = _qkv(dtype=torch.bfloat16, head_dim=64, seqlen=150, heads=2)
    dout = torch.randn(q.shape).bfloat16()

    def run():
        out = flash_attn_func(q, k, v, causal=True, backend="cuda-emu")
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    monkeypatch.setenv("PHI_SIMT_SEED", "0")
    base = run()
    monkeypatch.setenv("PHI_SIMT_SEED", str(seed))
    again = run()
    torch.testing.assert_close(again[0], base[0], atol=0, rtol=0)  # forward: no atomics, bit-identical
    for g, b in zip(again[1:], base[1:]):
        torch.testing.assert_close(g.float(), b.float(), atol=2e-2, rtol=0)


def test_emulator_counters_are_reported():
    torch.ops.phi_kernels_emu.emu_stats_reset()
    q, k, v = _qkv(seqlen=64)
    flash_attn_func(q, k, v, causal=True, backend="cuda-emu").sum().backward()
    import json

    stats = json.loads(torch.ops.phi_kernels_emu.emu_stats())
    fwd, bwd = stats["flash_fwd_kernel<hdim64, fp16>"], stats["flash_bwd_kernel<hdim64, fp16>"]
    assert fwd["launches"] == 1 and fwd["ctas"] == 2 and fwd["threads"] == 2 * 128  # (1 q tile, b1, h2)
    assert bwd["ctas"] == 2 and bwd["threads"] == 2 * 256 and bwd["atomics"] > 0
    torch.ops.phi_kernels_emu.emu_stats_reset()
    assert json.loads(torch.ops.phi_kernels_emu.emu_stats()) == {}


def test_more_sequences_than_a_grid_dimension_holds():
    """A packed batch may hold more than 65535 sequences (grid.y's limit): the CUDA launches put
    (tile, sequence) pairs in grid.x. Rotary runs 70000 one-token sequences; flash attention's
    plan for them fits the launch limits (its emulated run would take minutes)."""
    from phi_kernels.reference import apply_rotary_ref

    n = 70_000
    x = torch.randn(n, 1, 64)
    cu = torch.arange(n + 1, dtype=torch.int32)
    cos, sin = rotary_cos_sin(4, 32)
    out = apply_rotary(x, cos, sin, cu_seqlens=cu, max_seqlen=1, seqlen_offsets=2, backend="cuda-emu")
    torch.testing.assert_close(out, apply_rotary_ref(x, cos, sin, cu_seqlens=cu, seqlen_offsets=2), atol=1e-5,
                               rtol=1e-5)
    q = torch.randn(n, 2, 64).half()
    lse = torch.empty(2, n)
    for backward in (False, True):
        options = FlashAttnArgs(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1, max_seqlen_k=1, softmax_scale=1.0)
        _, gx, gy, gz, _, _ = torch.ops.phi_kernels.flash_attn_cuda_plan(q, q, q, *options.positional(), q, lse,
                                                                          backward)
        assert (gx, gy, gz) == (n, 2, 1)
