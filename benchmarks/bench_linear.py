"""linear for a few rows (a decoding step's projections): phi_kernels.linear against torch, fp32
on the CPU.

Shapes (out_features N x in_features K) for 1 and 4 rows of x: phi tiny's decoding projections
(qkv 768x256, attention out 256x256, MLP 1024x256 and 256x1024, lm_head 8192x256) and
phi-1.5's (2048x2048, MLP 8192x2048 and 2048x8192, lm_head 51200x2048; quick mode keeps
2048x2048 only). Work = the weight's bytes, read once per call: GB/s.
Providers: ours through the public API (what a model pays: argument checks, backend choice,
output allocation) and the kernel op with a preallocated output; peers: F.linear (what
nn.Linear runs) and torch.matmul against a weight transposed once beforehand (x @ W^T with W^T
contiguous, the other layout torch's BLAS offers), both with the bias.
Threads: torch's (and so the kernel's OpenMP) thread count, e.g. OMP_NUM_THREADS=1; the ISA:
PHI_KERNELS_CPU_CAPABILITY=avx2 with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2 holds both sides to AVX2. Both are recorded with every result.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import bench, quick_mode
from phi_kernels import backend_status, linear

DTYPE = torch.float32
TINY = [(256, 256), (768, 256), (1024, 256), (256, 1024), (8192, 256)]
PHI_15 = [(2048, 2048)] if quick_mode() else [(2048, 2048), (8192, 2048), (2048, 8192), (51200, 2048)]
ROWS = [1, 4]
PROVIDERS = ["phi_kernels cpu", "phi_kernels cpu kernel, preallocated out", "torch F.linear",
             "torch matmul, pre-transposed weight"]
# Shape-major order, so consecutive cases share one (cached) weight: phi-1.5's lm_head is 400 MB.
CASES = [(rows, n, k, provider) for n, k in TINY + PHI_15 for rows in ROWS for provider in PROVIDERS]


@functools.lru_cache(maxsize=1)
def _weights(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen, dtype=DTYPE) / k**0.5
    return w, w.t().contiguous(), torch.randn(n, generator=gen, dtype=DTYPE)


@pytest.mark.parametrize("rows,n,k,provider", CASES,
                         ids=[f"M{rows}-{n}x{k}-{p.replace(' ', '_').replace(',', '')}" for rows, n, k, p in CASES])
def test_linear(benchmark, rows, n, k, provider):
    ours = provider.startswith("phi_kernels")
    if ours and not backend_status("cpu", "cpu").available:
        pytest.skip(f"cpu: {backend_status('cpu', 'cpu').reason}")
    w, w_t, b = _weights(n, k)
    x = torch.randn(rows, k, dtype=DTYPE)
    if provider == "phi_kernels cpu":
        fn = functools.partial(linear, x, w, b, backend="cpu")
    elif provider == "phi_kernels cpu kernel, preallocated out":
        fn = functools.partial(torch.ops.phi_kernels.linear_out.default, x, w, b, torch.empty(rows, n, dtype=DTYPE))
    elif provider == "torch F.linear":
        fn = functools.partial(F.linear, x, w, b)
    else:
        fn = functools.partial(torch.addmm, b, x, w_t)  # b + x @ W^T, W^T stored (K, N)
    with torch.inference_mode():  # decoding runs without autograd
        bench(benchmark, fn, group=f"linear M{rows} {n}x{k} fp32", provider=provider, ours=ours,
              work=n * k * w.element_size(), unit="GB/s", shape=(rows, n, k), dtype=DTYPE, device="cpu")
