"""Rotary embedding throughput: phi-1.5 shapes (32 heads, head_dim 64, rotary_dim 32), q and k.

Work = bytes moved by an out-of-place rotation of q and k: read and write every element
(pass-through dims included, since an out-of-place op must copy them) plus the cos/sin rows.
Peers: Hugging Face transformers' eager phi rotary (slice, apply_rotary_pos_emb, cat) in its
native (batch, heads, seqlen, head_dim) layout; flash-attention's rotary on GPU when installed.
Roofline: a plain copy of the same q and k bytes (the machine's copy bandwidth, measured here).
CPU: fp32 (bf16 matmul-free but still slow on this CPU); GPU: bf16.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import bench, quick_mode
from phi_kernels import apply_rotary, backend_status, rotary_cos_sin
from phi_kernels.rotary import RotaryArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
HEADS, HEAD_DIM, ROTARY_DIM, BATCH = 32, 64, 32, 4
SEQLENS = [512] if quick_mode() else [512, 2048]


def _inputs(seqlen):
    q = torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k = torch.randn_like(q)
    cos, sin = rotary_cos_sin(seqlen, ROTARY_DIM, device=DEVICE, dtype=DTYPE)
    return q, k, cos, sin


def _bytes(q, cos):
    return 2 * 2 * q.numel() * q.element_size() + 2 * cos.numel() * cos.element_size()


def _group(seqlen):
    return f"rotary q+k b{BATCH} s{seqlen} h{HEADS} d{HEAD_DIM} rd{ROTARY_DIM} {str(DTYPE)[6:]}"


@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "ref"])
def test_rotary_ours(benchmark, backend, inplace, seqlen):
    """Out-of-place includes allocating the output: on the CPU a fresh 32 MB tensor page-faults
    on first touch, which costs several times the kernel itself (glibc returns big blocks to the
    OS on free). In-place (what a model does to a fresh q/k projection) only moves the rotary dims."""
    status = backend_status(backend, DEVICE)
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    q, k, cos, sin = _inputs(seqlen)

    def fn():
        return (apply_rotary(q, cos, sin, backend=backend, inplace=inplace),
                apply_rotary(k, cos, sin, backend=backend, inplace=inplace))

    # Work is the task's bytes for every provider, so ratios are time ratios for the same task.
    # In-place moves only the rotary dims; its actual memory traffic is recorded beside.
    tput = bench(benchmark, fn, group=_group(seqlen),
                 provider=f"phi_kernels {backend} {'inplace' if inplace else 'out-of-place'}",
                 ours=True, work=_bytes(q, cos), unit="GB/s", shape=tuple(q.shape), dtype=DTYPE, device=DEVICE)
    if inplace:
        benchmark.extra_info["actual_bytes_GB/s"] = tput * ROTARY_DIM / HEAD_DIM


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_rotary_hf_eager(benchmark, seqlen):
    modeling_phi = pytest.importorskip("transformers.models.phi.modeling_phi")
    q, k, cos, sin = _inputs(seqlen)
    q_hf, k_hf = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # (B, H, T, D)
    cos_hf = torch.cat((cos, cos), dim=-1)[None]  # (1, T, rotary_dim), HF's cache layout
    sin_hf = torch.cat((sin, sin), dim=-1)[None]

    def fn():  # what PhiAttention.forward does around apply_rotary_pos_emb
        q_rot, q_pass = q_hf[..., :ROTARY_DIM], q_hf[..., ROTARY_DIM:]
        k_rot, k_pass = k_hf[..., :ROTARY_DIM], k_hf[..., ROTARY_DIM:]
        q_rot, k_rot = modeling_phi.apply_rotary_pos_emb(q_rot, k_rot, cos_hf, sin_hf)
        return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)

    bench(benchmark, fn, group=_group(seqlen), provider="transformers eager", ours=False,
          work=_bytes(q, cos), unit="GB/s", shape=tuple(q.shape), dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_rotary_flash_attn(benchmark, seqlen):
    if DEVICE != "cuda":
        pytest.skip("flash-attention's rotary needs a GPU")
    fa_rotary = pytest.importorskip("flash_attn.layers.rotary", reason="flash-attn is not installed")
    q, k, cos, sin = _inputs(seqlen)

    def fn():
        return fa_rotary.apply_rotary_emb(q, cos, sin), fa_rotary.apply_rotary_emb(k, cos, sin)

    bench(benchmark, fn, group=_group(seqlen), provider="flash-attn rotary", ours=False,
          work=_bytes(q, cos), unit="GB/s", shape=tuple(q.shape), dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("seqlen", SEQLENS)
def test_rotary_copy_roofline(benchmark, seqlen):
    q, k, cos, sin = _inputs(seqlen)
    oq, ok = torch.empty_like(q), torch.empty_like(k)

    def fn():
        oq.copy_(q)
        ok.copy_(k)

    bench(benchmark, fn, group=_group(seqlen), provider="copy of the same bytes", ours=False, roofline=True,
          work=_bytes(q, cos), unit="GB/s", shape=tuple(q.shape), dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_rotary_kernel_only(benchmark, backend, seqlen):
    """The C++ kernel writing into preallocated outputs: its memory bandwidth, free of the
    allocation cost that the out-of-place API pays (compare with the copy roofline)."""
    status = backend_status(backend, DEVICE)
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    q, k, cos, sin = _inputs(seqlen)
    oq, ok = torch.empty_like(q), torch.empty_like(k)
    kernel = torch.ops.phi_kernels.rotary_out
    options = RotaryArgs(max_seqlen=seqlen).positional()

    def fn():
        kernel(q, cos, sin, *options, oq)
        kernel(k, cos, sin, *options, ok)

    bench(benchmark, fn, group=_group(seqlen), provider=f"phi_kernels {backend} kernel, preallocated out",
          ours=True, work=_bytes(q, cos), unit="GB/s", shape=tuple(q.shape), dtype=DTYPE, device=DEVICE)
