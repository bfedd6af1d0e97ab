"""One optimizer step, in GB/s of the minimum traffic (p, m, v and a master copy read and
written once, g read once: 28 B/param for fp32 p, g, m, v; 30 B/param for bf16 p, g + fp32 master, m, v).

Workloads: a phi-1.5-like list of tensors (every weight and bias of the model's layers, scaled
down on the CPU) and one flat tensor (50M elements on the CPU, 1.4B-param
phi-1.5 scale on a GPU). Providers: ours per available backend; torch AdamW foreach and fused;
DeepSpeedCPUAdam on the CPU; apex / DeepSpeed FusedAdam on a GPU when installed.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import bench, quick_mode
from phi_kernels import FusedAdam, backend_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KW = dict(lr=2e-4, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)


def _phi_like_shapes(layers: int, hidden: int) -> list[tuple[int, ...]]:
    """Weights and biases of a phi block (q, k, v, dense, fc1, fc2, LayerNorm) x layers."""
    ffn = 4 * hidden
    block = [(hidden, hidden), (hidden,)] * 4 + [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,), (hidden,), (hidden,)]
    return block * layers


if DEVICE == "cuda":
    WORKLOADS = {"phi-1.5 layers": _phi_like_shapes(24, 2048), "flat 1.4B": [(1_418_270_720,)]}
else:
    WORKLOADS = {"phi-like 4x512": _phi_like_shapes(4, 512),
                 "flat 50M": [(5_000_000 if quick_mode() else 50_000_000,)]}
LAYOUTS = {"fp32": (torch.float32, False, 28), "bf16+master": (torch.bfloat16, True, 30)}


def _params(shapes, dtype):
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _group(workload, layout, shapes):
    n = sum(torch.Size(s).numel() for s in shapes)
    return f"adamw step {workload} ({len(shapes)} tensors, {n / 1e6:.1f}M params) {layout}"


def _run(benchmark, provider, ours, workload, layout, make_opt):
    shapes = WORKLOADS[workload]
    dtype, master, bytes_per_param = LAYOUTS[layout]
    params = _params(shapes, dtype)
    opt = make_opt(params, master)
    n = sum(p.numel() for p in params)
    bench(benchmark, opt.step, group=_group(workload, layout, shapes), provider=provider, ours=ours,
          work=bytes_per_param * n, unit="GB/s", shape=f"{len(shapes)} tensors, {n} params", dtype=dtype,
          device=DEVICE, warmup=2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_fused_adam_ours(benchmark, backend, workload, layout):
    status = backend_status(backend, DEVICE)
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    _run(benchmark, f"phi_kernels FusedAdam {backend}", True, workload, layout,
         lambda ps, master: FusedAdam(ps, master_weights=master, backend=backend, **KW))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_torch_adamw(benchmark, impl, workload, layout):
    if layout == "bf16+master":
        pytest.skip("torch AdamW has no master weights (it keeps bf16 state): not the same work")
    _run(benchmark, f"torch AdamW {impl}", False, workload, layout,
         lambda ps, master: torch.optim.AdamW(ps, **{impl: True}, **KW))


@pytest.mark.parametrize("layout", ["fp32"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_deepspeed_cpu_adam(benchmark, workload, layout):
    if DEVICE != "cpu":
        pytest.skip("DeepSpeedCPUAdam is the CPU (ZeRO-Offload) peer")
    adam = pytest.importorskip("deepspeed.ops.adam", reason="deepspeed is not installed")
    try:
        make = lambda ps, master: adam.DeepSpeedCPUAdam(ps, adamw_mode=True, **KW)  # noqa: E731
        make([torch.zeros(2, requires_grad=True)], False)
    except Exception as e:  # its C++ op is JIT-built on first use
        pytest.skip(f"DeepSpeedCPUAdam unavailable: {e}")
    _run(benchmark, "DeepSpeedCPUAdam", False, workload, layout, make)


@pytest.mark.parametrize("layout", ["fp32"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("peer", ["apex", "deepspeed"])
def test_gpu_fused_adam_peers(benchmark, peer, workload, layout):
    if DEVICE != "cuda":
        pytest.skip(f"{peer} FusedAdam needs a GPU")
    if peer == "apex":
        cls = pytest.importorskip("apex.optimizers", reason="apex is not installed").FusedAdam
    else:
        cls = pytest.importorskip("deepspeed.ops.adam", reason="deepspeed is not installed").FusedAdam
    _run(benchmark, f"{peer} FusedAdam", False, workload, layout,
         lambda ps, master: cls(ps, adam_w_mode=True, **KW))
