"""flash_attn_with_kvcache: the new keys land in the cache at each row's offset, and each row
attends to its own filled prefix (rows of different lengths: batched decoding), on every backend
against the fp64 reference; the kernels' seqused_k path; bad input."""
from __future__ import annotations

import math
import os

import pytest
import torch

from phi_kernels import backend_status, flash_attn_func, flash_attn_with_kvcache
from phi_kernels.flash_attn import FlashAttnArgs
from phi_kernels.reference import flash_attn_ref
from tests.conftest import CUDA_KERNELS, DEVICE, kernel_backends

# cuda-emu (the CUDA kernels under the SIMT emulator, CPU tensors) runs every cuda case without a GPU.
BACKENDS = [p for p in kernel_backends() if p.values[0] != "cuda"] + [
    pytest.param("cuda", marks=pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")), "ref"]


def _expected(q, k_cache, v_cache, k, v, lens, causal, window, softcap, dtype):
    """The cache after the write and the attention output, built row by row in fp64 (the oracle
    slices each row's prefix; it never sees seqused_k)."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    new = 0 if k is None else k.shape[1]
    outs, plain = [], []
    left, right = window
    wnd = (left, 0) if causal else (left, right)
    for b, n in enumerate(lens):
        if new:
            kc[b, n:n + new], vc[b, n:n + new] = k[b].double(), v[b].double()
        used = n + new
        kw = dict(softmax_scale=1 / math.sqrt(q.shape[-1]), window_size=wnd, softcap=softcap)
        outs.append(flash_attn_ref(q[b:b + 1].double(), kc[b:b + 1, :used], vc[b:b + 1, :used], **kw)[0])
        plain.append(flash_attn_ref(q[b:b + 1], kc[b:b + 1, :used].to(dtype), vc[b:b + 1, :used].to(dtype),
                                    upcast=False, **kw)[0])
    return kc, vc, torch.cat(outs), torch.cat(plain)


CASES = [  # (seqlen_q = seqlen_new, heads, kv_heads, head_dim, causal, window, softcap, lens)
    (1, 4, 4, 64, True, (-1, -1), 0.0, [0, 7, 40]),  # one decoding step, one row starting empty
    (5, 4, 2, 64, True, (-1, -1), 0.0, [3, 0, 20]),  # a chunk of 5 (prefill continuation), GQA
    (3, 2, 1, 128, False, (-1, -1), 0.0, [10, 33, 1]),  # non-causal, MQA, head_dim 128
    (4, 2, 2, 64, True, (6, -1), 30.0, [25, 2, 9]),  # sliding window + softcap
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"q{c[0]}h{c[1]}/{c[2]}d{c[3]}{'c' if c[4] else ''}w{c[5][0]}"
                                             for c in CASES])
def test_kvcache_vs_fp64(backend, dtype, case):
    if backend in CUDA_KERNELS and (dtype == torch.float32 or case[3] not in (64, 128)):
        pytest.skip(f"{backend} backend: fp16/bf16 with head_dim 64 or 128 only")
    sq, heads, kv_heads, d, causal, window, softcap, lens = case
    batch, cache_len = len(lens), 48
    mk = lambda *s: torch.randn(*s, device=DEVICE).to(dtype)  # noqa: E731
    q, k, v = mk(batch, sq, heads, d), mk(batch, sq, kv_heads, d), mk(batch, sq, kv_heads, d)
    k_cache, v_cache = mk(batch, cache_len, kv_heads, d), mk(batch, cache_len, kv_heads, d)
    kc64, vc64, o64, olo = _expected(q, k_cache, v_cache, k, v, lens, causal, window, softcap, dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal,
                                           window_size=window, softcap=softcap, return_softmax_lse=True,
                                           backend=backend)
    # The write is exact (a copy) and touches nothing outside rows [lens[b], lens[b] + sq).
    assert torch.equal(k_cache.double(), kc64) and torch.equal(v_cache.double(), vc64)
    err, plain = (out.double() - o64).abs().max().item(), (olo.double() - o64).abs().max().item()
    assert err <= 2 * plain + 1e-5, (err, plain)
    assert lse.shape == (batch, heads, sq) and lse.dtype == torch.float32


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [(-1, -1), (90, -1)], ids=["full", "window90"])
def test_cpu_decoding_split_over_keys(two_threads, dtype, window):
    """One sequence, more threads than sequences and a long cache: the CPU kernel splits the
    keys between threads and merges the parts' softmax states (with a window, the first part
    sees no key at all)."""
    if not backend_status("cpu", "cpu").available:
        pytest.skip("needs the CPU kernels")
    torch.manual_seed(0)
    heads, kv_heads, d, cache_len, lens = 16, 8, 64, 1100, [1037]
    mk = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    q, k_cache, v_cache = mk(1, 1, heads, d), mk(1, cache_len, kv_heads, d), mk(1, cache_len, kv_heads, d)
    _, _, o64, olo = _expected(q, k_cache, v_cache, None, None, lens, True, window, 0.0, dtype)
    with torch.no_grad():
        out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                      causal=True, window_size=window, backend="cpu")
    err, plain = (out.double() - o64).abs().max().item(), (olo.double() - o64).abs().max().item()
    assert err <= 2 * plain + 1e-5, (err, plain)


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def cpu_capability(request, monkeypatch):
    """Each CPU capability this machine supports (PHI_KERNELS_CPU_CAPABILITY): the decoding kernel
    keeps heads in the lanes of a register, 4, 8 or 16 of them."""
    if not backend_status("cpu", "cpu").available:
        pytest.skip("needs the CPU kernels")
    supported = list(torch.ops.phi_kernels.cpu_capabilities())
    if request.param not in supported:
        pytest.skip(f"this CPU lacks {request.param} (it supports {', '.join(supported)})")
    monkeypatch.setenv("PHI_KERNELS_CPU_CAPABILITY", request.param)
    return request.param


DECODE_LAYOUTS = [  # (heads, kv_heads, head_dim, seqlen_q, cache, window, softcap)
    (32, 32, 64, 1, "dense", (-1, -1), 0.0),  # phi-1.5: compiled for head_dim 64, heads in whole registers
    (16, 16, 128, 2, "rows apart", (-1, -1), 5.0),  # head_dim 128; k / v views of one (b, s, 2, h, d) buffer
    (12, 4, 72, 3, "dense", (100, -1), 0.0),  # GQA, heads and head_dim not whole AVX-512 registers: any layout
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lens", [[130], [525], [9, 301]], ids=["130 keys", "525 keys", "2 rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", DECODE_LAYOUTS, ids=["h32d64", "h16d128 softcap", "gqa d72 window"])
def test_cpu_decoding_kernel(cpu_capability, threads, lens, dtype, layout):
    """The CPU decoding kernel against the fp64 oracle, on every capability: one task for all
    heads (1 thread), the heads split between threads (130 keys) or the keys (525 keys, one
    sequence: the parts' softmax states merged), rows of different lengths; query rows of 1 to
    3; key counts that leave a tail of the 4-key passes."""
    heads, kv_heads, d, sq, cache, window, softcap = layout
    torch.manual_seed(0)
    batch, cache_len = len(lens), max(lens) + 7
    mk = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    q = mk(batch, sq, heads, d)
    if cache == "dense":
        k_cache, v_cache = mk(batch, cache_len, kv_heads, d), mk(batch, cache_len, kv_heads, d)
    else:
        kv = mk(batch, cache_len, 2, kv_heads, d)
        k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    _, _, o64, olo = _expected(q, k_cache, v_cache, None, None, lens, True, window, softcap, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                               causal=True, window_size=window, softcap=softcap,
                                               return_softmax_lse=True, backend="cpu")
    finally:
        torch.set_num_threads(before)
    err, plain = (out.double() - o64).abs().max().item(), (olo.double() - o64).abs().max().item()
    assert err <= 2 * plain + 1e-5, (err, plain)
    lse64 = torch.cat([flash_attn_ref(q[b:b + 1].double(), k_cache[b:b + 1, :n].double(), v_cache[b:b + 1, :n].double(),
                                      softmax_scale=1 / math.sqrt(d), window_size=(window[0], 0), softcap=softcap)[1]
                       for b, n in enumerate(lens)])
    torch.testing.assert_close(lse.double(), lse64, atol=1e-4, rtol=1e-4)


def test_cpu_decoding_kernel_dropout(cpu_capability):
    """flash_attn_func with a few query rows takes the decoding kernel too, dropout included:
    the mask drawn from the seed is the oracle's."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 32, 64), torch.randn(1, 90, 32, 64), torch.randn(1, 90, 32, 64)
    torch.manual_seed(7)
    with torch.no_grad():
        out = flash_attn_func(q, k, v, dropout_p=0.25, causal=True, backend="cpu")
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # what the API draws
    ref = flash_attn_ref(q.double(), k.double(), v.double(), softmax_scale=1 / 8, window_size=(-1, 0), dropout_p=0.25,
                         seed=seed)[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_lengths_and_tensor_lengths_agree(backend):
    """An int cache_seqlens (every row alike) takes the dense path; a tensor of equal lengths the
    seqused_k path: same result. (fp16 for the CUDA kernels, which take no fp32.)"""
    dtype = torch.float16 if backend in CUDA_KERNELS else torch.float32
    q = torch.randn(2, 1, 4, 64, device=DEVICE).to(dtype)
    kv = [torch.randn(2, 32, 2, 64, device=DEVICE).to(dtype) for _ in range(2)]
    new = [torch.randn(2, 1, 2, 64, device=DEVICE).to(dtype) for _ in range(2)]
    with torch.no_grad():
        a = flash_attn_with_kvcache(q, kv[0].clone(), kv[1].clone(), *new, cache_seqlens=9, causal=True, backend=backend)
        b = flash_attn_with_kvcache(q, kv[0].clone(), kv[1].clone(), *new, causal=True, backend=backend,
                                    cache_seqlens=torch.full((2,), 9, dtype=torch.int32, device=DEVICE))
    tol = 1e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_row_outputs_zero(backend):
    """A row whose cache is empty and that brings no new key sees nothing: out 0, lse +inf.
    (fp16 for the CUDA kernels, which take no fp32.)"""
    dtype = torch.float16 if backend in CUDA_KERNELS else torch.float32
    q = torch.randn(2, 1, 2, 64, device=DEVICE).to(dtype)
    kc, vc = (torch.randn(2, 16, 2, 64, device=DEVICE).to(dtype) for _ in range(2))
    with torch.no_grad():
        out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([0, 5], dtype=torch.int32,
                                                                                 device=DEVICE),
                                           return_softmax_lse=True, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()
    ref = flash_attn_ref(q[1:], kc[1:, :5], vc[1:, :5], softmax_scale=1 / 8)[0]
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out[1:].float(), ref.float(), atol=tol, rtol=tol)


def test_whole_cache_without_lengths():
    q, kc, vc = torch.randn(1, 2, 2, 64), torch.randn(1, 10, 2, 64), torch.randn(1, 10, 2, 64)
    with torch.no_grad():
        out = flash_attn_with_kvcache(q, kc, vc, causal=True, backend="cpu")
    torch.testing.assert_close(out, flash_attn_ref(q, kc, vc, softmax_scale=1 / 8, window_size=(-1, 0))[0],
                               atol=1e-5, rtol=1e-5)


def test_cpu_op_rejects_out_of_range_seqused_k():
    """The C++ op checks seqused_k itself on the CPU (its kernels index keys through it)."""
    q, k = torch.randn(2, 1, 2, 64), torch.randn(2, 8, 2, 64)
    out, lse = torch.empty_like(q), torch.empty(2, 2, 1)
    def options(seqused_k):
        return FlashAttnArgs(seqused_k=seqused_k, max_seqlen_q=1, max_seqlen_k=8, softmax_scale=0.125).positional()

    with pytest.raises(RuntimeError, match=r"seqused_k\[1\] = 9 must be in \[0, 8\]"):
        torch.ops.phi_kernels.flash_attn_forward_out(q, k, k, *options(torch.tensor([3, 9], dtype=torch.int32)), out,
                                                     lse)
    with pytest.raises(RuntimeError, match="seqused_k must be a contiguous int32"):
        torch.ops.phi_kernels.flash_attn_forward_out(q, k, k, *options(torch.tensor([3, 4])), out, lse)


def _bad():
    q, kc = torch.randn(2, 1, 4, 64), torch.randn(2, 8, 2, 64)
    kn = torch.randn(2, 1, 2, 64)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    return [
        ("grad", lambda: flash_attn_with_kvcache(q.clone().requires_grad_(), kc, kc), "inference only"),
        ("k without v", lambda: flash_attn_with_kvcache(q, kc, kc, kn, None, cache_seqlens=lens), "together"),
        ("no lengths with new keys", lambda: flash_attn_with_kvcache(q, kc, kc, kn, kn), "cache_seqlens is required"),
        ("int64 lengths", lambda: flash_attn_with_kvcache(q, kc, kc, kn, kn, cache_seqlens=lens.long()), "int32"),
        ("lengths shape", lambda: flash_attn_with_kvcache(q, kc, kc, kn, kn, cache_seqlens=lens[:1]), r"\(2,\)"),
        ("overflow", lambda: flash_attn_with_kvcache(q, kc, kc, kn, kn, cache_seqlens=lens + 1), "cache_len = 8"),
        ("int overflow", lambda: flash_attn_with_kvcache(q, kc, kc, kn, kn, cache_seqlens=8), "cache_len = 8"),
        ("negative", lambda: flash_attn_with_kvcache(q, kc, kc, kn, kn, cache_seqlens=lens - 4), r"\[-1, 3\]"),
        ("new kv heads", lambda: flash_attn_with_kvcache(q, kc, kc, kn[:, :, :1], kn[:, :, :1], cache_seqlens=lens),
         "kv_heads"),
        ("cache dtype", lambda: flash_attn_with_kvcache(q, kc, kc, kn.half(), kn.half(), cache_seqlens=lens), "dtype"),
        ("cache batch", lambda: flash_attn_with_kvcache(q, kc[:1], kc[:1]), "batch"),
        ("3-D cache", lambda: flash_attn_with_kvcache(q, kc[0], kc[0]), "k_cache must be a 4-D"),
    ]


@pytest.mark.parametrize("name,call,match", _bad(), ids=[c[0] for c in _bad()])
def test_bad_input(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_new_keys_decode_on_the_cpu_kernel_outside_the_test_environment():
    """Regression: after writing new keys, a loop variable once shadowed the chosen backend's name,
    and the call went to the Triton launcher. The tests' TRITON_INTERPRET=1 (conftest) hid it:
    the interpreter ran the step correctly, while a user's process without it crashed. So this
    runs a decoding step in a clean subprocess, on the automatic (cpu) and the ref backend."""
    import subprocess
    import sys

    code = """
import torch
from phi_kernels import flash_attn_with_kvcache
torch.manual_seed(0)
q, k, v = torch.randn(2, 1, 4, 64), torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)
outs = []
for backend in (None, "ref"):
    kc, vc = torch.zeros(2, 16, 2, 64), torch.zeros(2, 16, 2, 64)
    with torch.no_grad():
        outs.append(flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([3, 7], dtype=torch.int32),
                                            causal=True, backend=backend))
torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
print("ok")
"""
    env = {key: val for key, val in os.environ.items() if key not in ("TRITON_INTERPRET", "PHI_KERNELS_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
