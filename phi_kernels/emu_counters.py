"""Execution counters of the CUDA kernels, from running them in the SIMT emulator (cuda-emu).

    python -m phi_kernels.emu_counters            # also part of python -m phi_kernels.inspect

The emulator (csrc/simt) executes the CUDA kernels' own code on CPU tensors and counts, per
kernel: barriers, tensor-core (mma.m16n8k16), ldmatrix and shuffle instructions, float atomics,
shared-memory wavefronts of ldmatrix / st.shared / cp.async requests against the bank-conflict-
free ideal, and global requests with the 32-byte sectors they touch against the fewest that hold
their bytes (coalescing). Each kernel runs on a small grid shaped like one slice of a phi-1.5
call (one (sequence, head) of causal attention at seqlen 2048, 8 tokens x 32 heads of rotary,
64K-element chunks of Adam); per-CTA figures carry over, and `phi_ctas` says how many CTAs the
phi-1.5 call launches. These are counts of what the code does, not timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

# CTAs of the phi-1.5 calls the static report uses (inspect.CUDA_WORKLOADS): causal attention
# (8, 2048, 32, 64): 32 query tiles (forward) / key tiles (backward) of 64 per (sequence, head);
# rotary on q and k (4, 2048, 32, 64): 2 x 4 x 2048 / 8 blocks; AdamW over 1.42e9 params in
# 64K-element chunks.
PHI_CTAS = {
    "flash_fwd_kernel<hdim64": 8 * 32 * 2048 // 64,
    "flash_bwd_kernel<hdim64": 8 * 32 * 2048 // 64,
    "flash_fwd_kernel<hdim128": 8 * 16 * 2048 // 64,  # phi-2-like heads of 128 (16 heads)
    "flash_bwd_kernel<hdim128": 8 * 16 * 2048 // 64,
    "rotary_kernel": 2 * 4 * 2048 // 8,
    "adam_kernel": -(-1_418_270_720 // 65536),
}


@dataclasses.dataclass
class KernelCounters:
    kernel: str
    ctas: int  # CTAs the emulator ran
    phi_ctas: int  # CTAs of the phi-1.5 call (0: not modelled)
    per_cta: dict[str, float]  # barriers, mma, ldmatrix, shfl, atomics per CTA
    ldmatrix_conflict: float  # shared wavefronts / conflict-free wavefronts (1.0 = no bank conflicts)
    sts_conflict: float
    cp_async_conflict: float
    gld_sectors_per_request: float
    gld_ideal_per_request: float
    gst_sectors_per_request: float
    gst_ideal_per_request: float


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _summarise(name: str, c: dict) -> KernelCounters:
    ctas = max(c["ctas"], 1)
    phi = next((n for prefix, n in PHI_CTAS.items() if name.startswith(prefix)), 0)
    return KernelCounters(
        kernel=name, ctas=c["ctas"], phi_ctas=phi,
        per_cta={k: c[k] / ctas for k in ("barriers", "mma", "ldmatrix", "shfl", "atomics", "cp_async")},
        ldmatrix_conflict=_ratio(c["ldmatrix_wavefronts"], c["ldmatrix_ideal"]),
        sts_conflict=_ratio(c["sts_wavefronts"], c["sts_ideal"]),
        cp_async_conflict=_ratio(c["cp_async_wavefronts"], c["cp_async_ideal"]),
        gld_sectors_per_request=_ratio(c["gld_sectors"], c["gld_requests"]),
        gld_ideal_per_request=_ratio(c["gld_ideal_sectors"], c["gld_requests"]),
        gst_sectors_per_request=_ratio(c["gst_sectors"], c["gst_requests"]),
        gst_ideal_per_request=_ratio(c["gst_ideal_sectors"], c["gst_requests"]),
    )


def measure(seqlen: int = 2048, head_dims=(64, 128)) -> list[KernelCounters]:
    """Runs every CUDA kernel once in the emulator (attention fwd + bwd in fp16 and bf16 at each
    head_dim; rotary and every Adam variant in each dtype) and returns each kernel's counters. seqlen 2048 takes about a
    minute on 2 cores; the tests use 256."""
    from phi_kernels import FusedAdam, apply_rotary, flash_attn_func, rotary_cos_sin
    from phi_kernels._extension import emu_load_error

    if emu_load_error() is not None:
        raise RuntimeError(emu_load_error())
    ops = torch.ops.phi_kernels_emu
    ops.emu_stats_reset()
    gen = torch.Generator().manual_seed(0)
    for d in head_dims:
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = (torch.randn(1, seqlen, 1, d, generator=gen).to(dtype).requires_grad_() for _ in range(3))
            out = flash_attn_func(q, k, v, causal=True, backend="cuda-emu")
            out.backward(torch.randn(out.shape, generator=gen).to(dtype))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(1, min(seqlen, 256), 32, 64, generator=gen).to(dtype)
        cos, sin = rotary_cos_sin(x.shape[1], 32, dtype=dtype)
        apply_rotary(x, cos, sin, backend="cuda-emu")
        for amsgrad in (False, True):
            for master in (False, True) if dtype != torch.float32 else (False,):
                params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in (65536 * 2, 4097)]
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                FusedAdam(params, lr=1e-3, amsgrad=amsgrad, master_weights=master, backend="cuda-emu").step()
    stats = json.loads(ops.emu_stats())
    return [_summarise(name, c) for name, c in sorted(stats.items())]


def format_table(rows: list[KernelCounters]) -> str:
    lines = ["| CUDA kernel (emulated) | CTAs run | phi-1.5 CTAs | per CTA: barriers / mma / ldmatrix / shfl / atomics | "
             "smem wavefronts / ideal: ldmatrix, st.shared, cp.async | global sectors per request (ideal): load, store |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        p = r.per_cta
        lines.append(
            f"| `{r.kernel}` | {r.ctas} | {r.phi_ctas or ''} | {p['barriers']:.0f} / {p['mma']:.0f} / {p['ldmatrix']:.0f}"
            f" / {p['shfl']:.0f} / {p['atomics']:.0f} | {r.ldmatrix_conflict:.2f}, {r.sts_conflict:.2f}, "
            f"{r.cp_async_conflict:.2f} | {r.gld_sectors_per_request:.1f} ({r.gld_ideal_per_request:.1f}), "
            f"{r.gst_sectors_per_request:.1f} ({r.gst_ideal_per_request:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=2048, help="attention sequence length (default 2048)")
    ap.add_argument("--json", help="also write the counters to this file")
    args = ap.parse_args(argv)
    if args.seqlen < 1:
        ap.error(f"--seqlen must be >= 1, got {args.seqlen}")
    rows = measure(args.seqlen)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
