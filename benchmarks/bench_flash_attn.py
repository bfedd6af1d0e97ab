"""Flash attention throughput in TFLOP/s, flash-attention's convention: forward 4*b*s^2*h*d
(halved when causal), backward 2.5x forward, forward+backward 3.5x; a decoding step (one query
row against n cached keys) 4*b*n*h*d.

phi-1.5 shape: 32 heads, head_dim 64, causal; batch = 16k / seqlen on a GPU (as flash-attention's
benchmarks), small sizes on the CPU. Providers: ours per available backend (the Triton
interpreter is not a performance path and is skipped), torch SDPA per SDPA backend available on
the device, flash-attention when installed.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import bench, quick_mode
from phi_kernels import backend_status, flash_attn_func, flash_attn_with_kvcache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
HEADS, HEAD_DIM = 32, 64
if DEVICE == "cuda":
    SEQLENS = [512, 1024, 2048] if quick_mode() else [512, 1024, 2048, 4096, 8192]
    TOKENS = 16384
else:  # CPU: phi-1.5 heads, small sequences
    SEQLENS = [128] if quick_mode() else [128, 512, 1024, 2048]
    TOKENS = 512
DECODE_CACHE = [128] if quick_mode() else [128, 512, 1024, 2048]  # cached keys of a decoding step
MODES = ["fwd", "fwd+bwd"]
SDPA = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION}


def _flops(batch, seqlen, mode):
    fwd = 4 * batch * seqlen * seqlen * HEADS * HEAD_DIM / 2  # causal
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _inputs(seqlen, layout="bshd"):
    batch = max(1, TOKENS // seqlen)
    shape = (batch, seqlen, HEADS, HEAD_DIM) if layout == "bshd" else (batch, HEADS, seqlen, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    return batch, q, k, v


def _fn(attn, q, k, v, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return attn(q, k, v)
    else:
        def run():
            out = attn(q, k, v)
            out.backward(torch.ones_like(out))
    return run


def _record(benchmark, fn, provider, ours, batch, seqlen, mode):
    bench(benchmark, fn, group=f"attention {mode} causal h{HEADS} d{HEAD_DIM} s{seqlen} {str(DTYPE)[6:]}",
          provider=provider, ours=ours, work=_flops(batch, seqlen, mode), unit="TFLOP/s",
          shape=(batch, seqlen, HEADS, HEAD_DIM), dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "ref"])
def test_flash_attn_ours(benchmark, backend, seqlen, mode):
    status = backend_status(backend, DEVICE)
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    if backend == "cuda" and DTYPE not in (torch.float16, torch.bfloat16):
        pytest.skip("the CUDA kernels take fp16/bf16")
    batch, q, k, v = _inputs(seqlen)
    attn = lambda q, k, v: flash_attn_func(q, k, v, causal=True, backend=backend)  # noqa: E731
    _record(benchmark, _fn(attn, q, k, v, mode), f"phi_kernels {backend}", True, batch, seqlen, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("sdpa", list(SDPA))
def test_torch_sdpa(benchmark, sdpa, seqlen, mode):
    batch, q, k, v = _inputs(seqlen, layout="bhsd")

    def attn(q, k, v):
        with sdpa_kernel(SDPA[sdpa]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        _fn(attn, q, k, v, mode)()
    except RuntimeError as e:
        pytest.skip(f"SDPA {sdpa} unavailable here: {str(e).splitlines()[0][:120]}")
    _record(benchmark, _fn(attn, q, k, v, mode), f"torch SDPA {sdpa}", False, batch, seqlen, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_flash_attn_package(benchmark, seqlen, mode):
    if DEVICE != "cuda":
        pytest.skip("flash-attention needs a GPU")
    fa = pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    batch, q, k, v = _inputs(seqlen)
    attn = lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True)  # noqa: E731
    _record(benchmark, _fn(attn, q, k, v, mode), "flash-attn 2", False, batch, seqlen, mode)


# ----------------------------------------------------------------------------- decoding
# One new query row per sequence against a filled KV cache (b1, phi-1.5 heads): ours through
# flash_attn_with_kvcache with its (batch, seqlen, heads, d) cache, SDPA with its own
# (batch, heads, seqlen, d) layout, each as a decoding loop would hold it.


def _record_decode(benchmark, fn, provider, ours, cache):
    bench(benchmark, fn, group=f"attention decode 1 query h{HEADS} d{HEAD_DIM} kv{cache} {str(DTYPE)[6:]}",
          provider=provider, ours=ours, work=4 * cache * HEADS * HEAD_DIM, unit="GFLOP/s",
          shape=(1, cache, HEADS, HEAD_DIM), dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("cache", DECODE_CACHE)
@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_decode_ours(benchmark, backend, cache):
    status = backend_status(backend, DEVICE)
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    q = torch.randn(1, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k_cache, v_cache = (torch.randn(1, cache, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))
    lengths = torch.full((1,), cache, dtype=torch.int32, device=DEVICE)

    def run():
        with torch.no_grad():
            return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True, backend=backend)

    _record_decode(benchmark, run, f"phi_kernels {backend}", True, cache)


@pytest.mark.parametrize("cache", DECODE_CACHE)
@pytest.mark.parametrize("sdpa", list(SDPA))
def test_decode_torch_sdpa(benchmark, sdpa, cache):
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(1, HEADS, cache, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))

    def run():
        with torch.no_grad(), sdpa_kernel(SDPA[sdpa]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    try:
        run()
    except RuntimeError as e:
        pytest.skip(f"SDPA {sdpa} unavailable here: {str(e).splitlines()[0][:120]}")
    _record_decode(benchmark, run, f"torch SDPA {sdpa}", False, cache)
