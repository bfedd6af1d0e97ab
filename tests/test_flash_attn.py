"""flash_attn_func / varlen / qkvpacked: every backend against the fp64 reference with
flash-attention's rule (error <= 2x the error of a plain implementation in the same dtype;
gradients 3x), dropout reproduced from the seed, LSE, determinism, registration, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from phi_kernels import BackendUnavailableError, backend_status, flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
from phi_kernels.flash_attn import FlashAttnArgs
from phi_kernels.reference import dropout_keep_mask, flash_attn_ref
from tests.conftest import CUDA_KERNELS, DEVICE, kernel_backend, kernel_backends

# cuda-emu (the CUDA kernels under the SIMT emulator, CPU tensors) runs every cuda case without a GPU.
BACKENDS = [p for p in kernel_backends() if p.values[0] != "cuda"] + [
    pytest.param("cuda", marks=pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU"))]


def _window(causal, window):
    left, right = window
    return left, (0 if right < 0 else min(right, 0)) if causal else right


def _refs(q, k, v, dout, causal, window, softcap, dropout_p=0.0, seed=0, cu_q=None, cu_k=None):
    """(out, lse, grads) of the fp64 oracle and (out, grads) of the same math in q's dtype."""
    kw = dict(softmax_scale=1 / math.sqrt(q.shape[-1]), window_size=_window(causal, window), softcap=softcap,
              dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    res = []
    for cast, upcast in ((torch.float64, True), (q.dtype, False)):
        qs, ks, vs = (t.detach().to(cast).requires_grad_() for t in (q, k, v))
        out, lse = flash_attn_ref(qs, ks, vs, upcast=upcast, **kw)
        grads = torch.autograd.grad(out, (qs, ks, vs), dout.to(cast))
        res.append((out, lse, grads))
    return res


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_flash_rule(out, grads, ref64, ref_low, atol=1e-5, grad_atol=1e-4):
    """flash-attention's test rule: our error vs fp64 <= 2x (3x for grads) the error of the
    plain implementation in the same low precision, plus a tiny absolute slack."""
    (o64, _, g64), (olo, _, glo) = ref64, ref_low
    assert _err(out, o64) <= 2 * _err(olo, o64) + atol, (_err(out, o64), _err(olo, o64))
    for name, g, r64, rlo in zip("qkv", grads, g64, glo):
        assert _err(g, r64) <= 3 * _err(rlo, r64) + grad_atol, (f"d{name}", _err(g, r64), _err(rlo, r64))


CASES = [  # (seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
    (1, 1, 2, 2, 64, False, (-1, -1), 0.0),
    (17, 17, 2, 2, 64, True, (-1, -1), 0.0),
    (113, 200, 2, 1, 64, True, (-1, -1), 0.0),  # sq < sk: bottom-right causal (decoding-style), MQA
    (200, 113, 4, 2, 80, True, (-1, -1), 0.0),  # sq > sk: first rows see nothing; GQA; head_dim 80
    (113, 113, 2, 2, 80, False, (-1, -1), 0.0),
    (200, 200, 2, 1, 64, False, (32, 16), 0.0),  # sliding window, non-causal
    (150, 150, 2, 2, 64, True, (48, -1), 0.0),  # causal + left window (local attention)
    (65, 65, 2, 2, 64, True, (-1, -1), 30.0),  # softcap
    (1, 113, 2, 2, 64, True, (-1, -1), 0.0),  # one decoding step against a cache
    (130, 130, 2, 1, 128, True, (-1, -1), 0.0),  # head_dim 128 (the CUDA kernels' other instantiation)
]


def _skip_if_cuda_lacks(backend, dtype, head_dim=64):
    """The CUDA kernels (cuda, and cuda-emu that emulates them) take fp16/bf16 at head_dim 64/128;
    auto-dispatch sends the rest to triton."""
    if backend in CUDA_KERNELS and (dtype == torch.float32 or head_dim not in (64, 128)):
        pytest.skip(f"{backend} backend: fp16/bf16 with head_dim 64 or 128 only")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"q{c[0]}k{c[1]}h{c[2]}/{c[3]}d{c[4]}{'c' if c[5] else ''}"
                                            f"{'w' if c[6] != (-1, -1) else ''}{'s' if c[7] else ''}" for c in CASES])
def test_forward_backward_vs_fp64(backend, dtype, case):
    sq, sk, h, hkv, d, causal, window, softcap = case
    _skip_if_cuda_lacks(backend, dtype, d)
    q = torch.randn(2, sq, h, d, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(2, sk, hkv, d, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(2, sk, hkv, d, device=DEVICE).to(dtype).requires_grad_()
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                  return_attn_probs=True, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref64, ref_low = _refs(q, k, v, dout, causal, window, softcap)
    _assert_flash_rule(out, grads, ref64, ref_low)
    finite = torch.isfinite(ref64[1])
    assert torch.equal(torch.isinf(lse), torch.isinf(ref64[1])), "rows with no visible key have lse = +inf"
    torch.testing.assert_close(lse[finite].double(), ref64[1][finite], atol=1e-3 if dtype != torch.float32 else 1e-5,
                               rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_varlen_documents(backend, dtype):
    """Packed documents (one of length 1) attend only within themselves, k longer than q."""
    _skip_if_cuda_lacks(backend, dtype)
    lq, lk = [5, 1, 37, 70], [9, 1, 37, 83]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lq), 4, 64, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(sum(lk), 2, 64, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(sum(lk), 2, 64, device=DEVICE).to(dtype).requires_grad_()
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, return_attn_probs=True,
                                         backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref64, ref_low = _refs(q, k, v, dout, True, (-1, -1), 0.0, cu_q=cu_q, cu_k=cu_k)
    _assert_flash_rule(out, grads, ref64, ref_low)
    assert lse.shape == (4, sum(lq))
    # Independent check that documents do not mix: doc 2 alone gives the same rows.
    alone = flash_attn_func(q[6:43][None], k[10:47][None], v[10:47][None], causal=True, backend=backend)[0]
    torch.testing.assert_close(out[6:43].float(), alone.float(), atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_reproduced_by_reference(backend):
    torch.manual_seed(123)
    dtype = torch.float16 if backend in CUDA_KERNELS else torch.float32
    q, k, v = (torch.randn(1, 70, 2, 64, device=DEVICE).to(dtype).requires_grad_() for _ in range(3))
    torch.manual_seed(7)
    out = flash_attn_func(q, k, v, dropout_p=0.25, causal=True, backend=backend)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # what the API draws
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref64, ref_low = _refs(q, k, v, dout, True, (-1, -1), 0.0, dropout_p=0.25, seed=seed)
    _assert_flash_rule(out, grads, ref64, ref_low)
    torch.manual_seed(7)  # same seed, same mask, same result
    assert torch.equal(out, flash_attn_func(q, k, v, dropout_p=0.25, causal=True, backend=backend))


def test_dropout_keep_fraction():
    keep = dropout_keep_mask(987654321, torch.arange(8).view(8, 1, 1), torch.arange(512).view(1, 512, 1),
                             torch.arange(512).view(1, 1, 512), 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    # Different heads and seeds give different masks.
    assert not torch.equal(keep[0], keep[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_keep_fraction(backend):
    """Larger size through the kernel itself: with v = 1 and uniform attention the output is the
    kept fraction of each row (times 1/(1-p)). (The CUDA kernels: fp16 at head_dim 64.)"""
    dtype, d = (torch.float16, 64) if backend in CUDA_KERNELS else (torch.float32, 16)
    q = torch.zeros(1, 256, 1, d, device=DEVICE, dtype=dtype)
    k = torch.zeros(1, 256, 1, d, device=DEVICE, dtype=dtype)
    v = torch.ones(1, 256, 1, d, device=DEVICE, dtype=dtype)
    out = flash_attn_func(q, k, v, dropout_p=0.2, backend=backend)
    kept = out[..., 0].float().mean().item() * 0.8
    assert abs(kept - 0.8) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_backward_bitwise(backend):
    q, k, v = (torch.randn(1, 100, 4, 64, device=DEVICE).half().requires_grad_() for _ in range(3))
    k2, v2 = k[:, :, :2].detach().requires_grad_(), v[:, :, :2].detach().requires_grad_()
    if backend in CUDA_KERNELS:  # the CUDA backward adds dq with atomics: it declines rather than lie
        with pytest.raises(BackendUnavailableError, match="deterministic"):
            flash_attn_func(q, k2, v2, causal=True, deterministic=True, backend=backend)
        return
    runs = []
    for _ in range(2):
        out = flash_attn_func(q, k2, v2, causal=True, deterministic=True, backend=backend)
        runs.append(torch.autograd.grad(out, (q, k2, v2), torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkvpacked(backend):
    qkv = torch.randn(2, 33, 3, 2, 64, device=DEVICE).half()
    out = flash_attn_qkvpacked_func(qkv, causal=True, backend=backend)
    expect = flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, backend="ref")
    torch.testing.assert_close(out, expect, atol=2e-3, rtol=0)


def test_opcheck_and_compile():
    backend = "triton" if DEVICE == "cuda" or kernel_backend("triton").marks == () else "ref"
    q, k, v = (torch.randn(1, 20, 2, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    options = FlashAttnArgs(max_seqlen_q=20, max_seqlen_k=20, softmax_scale=0.125, window_right=0)
    args = (q, k, v, *options.positional(), backend)
    torch.library.opcheck(torch.ops.phi_kernels.flash_attn_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True, backend=backend).square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    loss.backward()
    g_compiled = q.grad.clone()
    q.grad = None
    f(q, k, v).backward()
    torch.testing.assert_close(g_compiled, q.grad)


@pytest.mark.parametrize("backend", CUDA_KERNELS)
def test_cuda_backend_explains_what_it_lacks(backend):
    q = torch.randn(1, 4, 2, 64, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        flash_attn_func(q, q, q, dropout_p=0.1, backend=backend)


def _bad():
    q = torch.randn(1, 8, 4, 64)
    kv = torch.randn(1, 8, 2, 64)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    p = torch.randn(8, 4, 64)
    return [
        ("dtype mismatch", lambda: flash_attn_func(q, kv.half(), kv), "share a dtype"),
        ("head_dim not multiple of 8", lambda: flash_attn_func(q[..., :60], kv[..., :60], kv[..., :60]), "multiple of 8"),
        ("head_dim > 256", lambda: flash_attn_func(*(torch.randn(1, 2, 1, 264),) * 3), r"\[8, 256\]"),
        ("heads not multiple", lambda: flash_attn_func(q, torch.randn(1, 8, 3, 64), torch.randn(1, 8, 3, 64)),
         "multiple of kv_heads"),
        ("k/v shapes", lambda: flash_attn_func(q, kv, kv[:, :4]), "same shape"),
        ("3-D without cu_seqlens", lambda: flash_attn_func(p, p, p), r"\(batch, seqlen"),
        ("cu_seqlens int64", lambda: flash_attn_varlen_func(p, p, p, cu.long(), cu, 5, 5), "int32"),
        ("cu_seqlens decreasing", lambda: flash_attn_varlen_func(p, p, p, torch.tensor([0, 5, 3, 8], dtype=torch.int32),
                                                                 torch.tensor([0, 5, 3, 8], dtype=torch.int32), 5, 5),
         "non-decreasing"),
        ("cu_seqlens wrong total", lambda: flash_attn_varlen_func(p, p, p, cu[:2], cu[:2], 3, 3), "end at 8"),
        ("max_seqlen too small", lambda: flash_attn_varlen_func(p, p, p, cu, cu, 4, 5), "max_seqlen_q 4"),
        ("dropout 1", lambda: flash_attn_func(q, kv, kv, dropout_p=1.0), "dropout_p"),
        ("bad window", lambda: flash_attn_func(q, kv, kv, window_size=(-2, 0)), "window_size"),
        ("negative softcap", lambda: flash_attn_func(q, kv, kv, softcap=-1.0), "softcap"),
        ("int tensors", lambda: flash_attn_func(q.long(), kv.long(), kv.long()), "float16, bfloat16 or float32"),
        ("qkv shape", lambda: flash_attn_qkvpacked_func(q), "qkv must be"),
    ]


@pytest.mark.parametrize("name,call,match", _bad(), ids=[c[0] for c in _bad()])
def test_bad_input(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- CUDA host side on CPU


def _plan(q, k, cu_q=None, cu_k=None, max_q=0, max_k=0, backward=False):
    varlen = cu_q is not None
    lse = torch.empty(q.shape[1], q.shape[0]) if varlen else torch.empty(q.shape[0], q.shape[2], q.shape[1])
    options = FlashAttnArgs(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                            softmax_scale=1.0)
    return torch.ops.phi_kernels.flash_attn_cuda_plan(q, k, k, *options.positional(), torch.empty_like(q), lse,
                                                      backward)


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_cuda_launch_plan(head_dim, dtype):
    """The CUDA launch (grid, block, shared memory) computed by the same host code the GPU path
    runs, from CPU tensors: one CTA per 64-row query tile (forward) / 64-key tile (backward) of
    the longest sequence, per sequence, per query head; shared memory within an A100's 163 KB.
    grid.x holds (tile, sequence) pairs and grid.y the heads, since grid.y stops at 65535."""
    q = torch.randn(2, 300, 8, head_dim, dtype=dtype)
    k = torch.randn(2, 129, 2, head_dim, dtype=dtype)
    hd, gx, gy, gz, threads, smem = _plan(q, k)
    assert (hd, gx, gy, gz) == (head_dim, math.ceil(300 / 64) * 2, 8, 1)
    assert threads == 128 and 0 < smem <= 163 * 1024
    hd, gx, gy, gz, threads, smem = _plan(q, k, backward=True)
    assert (hd, gx, gy, gz) == (head_dim, math.ceil(129 / 64) * 2, 8, 1)
    assert threads == 256 and 0 < smem <= 163 * 1024
    # Packed sequences: grid.x is the number of sequences times the tiles of max_seqlen.
    cu = torch.tensor([0, 100, 250, 260], dtype=torch.int32)
    qp, kp = torch.randn(260, 8, head_dim, dtype=dtype), torch.randn(260, 2, head_dim, dtype=dtype)
    assert _plan(qp, kp, cu, cu, 150, 150)[1:4] == [math.ceil(150 / 64) * 3, 8, 1]


@pytest.mark.parametrize("name,make,match", [
    ("head_dim 80", lambda: (torch.randn(1, 8, 2, 80).half(),) * 2, "head_dim 80"),
    ("float32", lambda: (torch.randn(1, 8, 2, 64),) * 2, "float32"),
    ("misaligned rows", lambda: (torch.randn(1 * 8 * 2 * 64 + 1).half()[1:].view(1, 8, 2, 64),) * 2, "16-byte aligned"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_cuda_host_side_rejects_what_the_kernels_lack(name, make, match):
    q, k = make()
    with pytest.raises(RuntimeError, match=match):
        _plan(q, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [(-1, 0), (300, 0)], ids=["causal", "window300"])
def test_cpu_long_sequence_packed(dtype, window):
    """From 1024 keys the CPU forward packs each head's K and V once for all its query blocks:
    against the fp64 oracle, with a NaN in a V row the last queries cannot see under the window
    (it must reach exactly the rows that see it)."""
    if not backend_status("cpu", "cpu").available:
        pytest.skip("needs the CPU kernels")
    torch.manual_seed(0)
    batch, seqlen, heads, d = 2, 1100, 2, 64
    q, k, v = (torch.randn(batch, seqlen, heads, d).to(dtype) for _ in range(3))
    v[1, 100, 0, 5] = float("nan")
    kw = dict(softmax_scale=1 / math.sqrt(d), window_size=window)
    ref, _ = flash_attn_ref(q.double(), k.double(), v.double(), **kw)
    plain, _ = flash_attn_ref(q, k, v, upcast=False, **kw)
    with torch.no_grad():
        out = flash_attn_func(q, k, v, causal=True, window_size=window, backend="cpu")
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    err = (out.double() - ref)[finite].abs().max().item()
    assert err <= 2 * (plain.double() - ref)[finite].abs().max().item() + 1e-5


@pytest.mark.parametrize("capability", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("window", [(-1, 0), (40, 0), (40, 24)], ids=["causal", "causal-left40", "window40,24"])
def test_cpu_banded_tiles_every_capability(capability, window, monkeypatch):
    """Tiles the mask cuts run banded products on the CPU (csrc/flash_attn/flash_cpu_tiles.h:
    column blocks and k ranges the mask hides are skipped), tiles it does not cut run whole; the
    register block differs per capability (4 / 8 / 16 lanes), so each one's forward and backward
    is held to the fp64 oracle on a shape with both kinds of tile and a ragged last query tile."""
    if not backend_status("cpu", "cpu").available:
        pytest.skip("needs the CPU kernels")
    if capability not in torch.ops.phi_kernels.cpu_capabilities():
        pytest.skip(f"this CPU lacks {capability}")
    monkeypatch.setenv("PHI_KERNELS_CPU_CAPABILITY", capability)
    torch.manual_seed(0)
    causal = window[1] == 0
    q, k, v = (torch.randn(1, 200, 2, 64) for _ in range(3))
    dout = torch.randn_like(q)
    ref64, ref32 = _refs(q, k, v, dout, causal, window, 0.0)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = flash_attn_func(qs, ks, vs, causal=causal, window_size=window, backend="cpu")
    grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    _assert_flash_rule(out, grads, ref64, ref32)
