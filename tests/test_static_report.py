"""The static GPU report (python -m phi_kernels.inspect): every CUDA kernel in the extension and
every Triton kernel compiled ahead of time for sm_80 / sm_90 has zero spills and shared memory
within the architecture's limit; tensor-core kernels contain tensor-core instructions."""
from __future__ import annotations

import subprocess
import sys

import pytest

from phi_kernels import inspect as pk_inspect
from phi_kernels.flash_attn import FlashAttnArgs


@pytest.fixture(scope="module")
def cuda_kernels():
    if not pk_inspect.extension_has_cuda():
        pytest.skip("phi_kernels._C was built without CUDA kernels")
    return pk_inspect.cuda_kernels()


@pytest.fixture(scope="module")
def triton_results():
    try:
        return pk_inspect.triton_results_subprocess()
    except RuntimeError as e:
        pytest.fail(str(e))


def test_cuda_kernels_for_both_archs(cuda_kernels):
    by_arch = {}
    for k in cuda_kernels:
        by_arch.setdefault(k.arch, set()).add(k.mangled)
    assert {"sm_80", "sm_90a"} <= set(by_arch), by_arch.keys()
    assert by_arch["sm_80"] == by_arch["sm_90a"], "every kernel is compiled for both archs"


def test_cuda_kernels_no_spills_and_fit(cuda_kernels):
    for k in cuda_kernels:
        lim = pk_inspect.SM_LIMITS[k.arch]
        assert k.spill_bytes == 0 and k.ldl_stl == 0, f"{k.name} {k.arch} spills: {k}"
        assert 0 < k.registers <= 255, k
        assert k.shared <= lim["smem_per_block"], k
        assert k.max_warps_per_sm() >= 4, k  # at least one 128-thread block fits by registers


def test_triton_kernels_no_spills_and_fit(triton_results):
    assert triton_results, "no Triton kernel was compiled"
    archs = {r["arch"] for r in triton_results}
    assert {"sm_80", "sm_90"} <= archs
    for r in triton_results:
        lim = pk_inspect.SM_LIMITS[r["arch"]]
        assert r["spill_bytes"] == 0 and r["stack"] == 0, r
        assert r["shared"] <= lim["smem_per_block"], r
        if r["tensor_core"]:
            assert r["mma"] + r["wgmma"] > 0 and r["hmma_sass"] > 0, f"no tensor-core instructions: {r}"
    print("\n" + pk_inspect.format_triton_table([pk_inspect.SimpleNamespace(**r) for r in triton_results]))


def test_report_command_runs(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "phi_kernels.inspect", "--no-triton", "--emu-seqlen", "256", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Static GPU report" in proc.stdout and out.exists()


def test_emulator_counters_of_every_cuda_kernel():
    """Executed in the SIMT emulator, every CUDA kernel reports its counters, and they show what
    the kernels' design claims: the XOR swizzle makes every ldmatrix, st.shared and cp.async
    request of the flash kernels bank-conflict free; the tensor-core work per CTA is what the
    tile loops imply; Adam's and rotary's loads are coalesced."""
    from phi_kernels import emu_counters
    from phi_kernels._extension import emu_load_error

    if emu_load_error() is not None:
        pytest.skip(emu_load_error())
    rows = {r.kernel: r for r in emu_counters.measure(seqlen=128)}
    flash = [f"flash_{p}_kernel<hdim{d}, {t}>" for p in ("fwd", "bwd") for d in (64, 128) for t in ("fp16", "bf16")]
    assert set(flash) <= set(rows), sorted(rows)
    assert any(k.startswith("rotary_kernel") for k in rows) and any(k.startswith("adam_kernel") for k in rows)
    for name in flash:
        r = rows[name]
        assert r.ldmatrix_conflict == 1.0 and r.cp_async_conflict == 1.0, r
        assert r.sts_conflict in (0.0, 1.0), r  # the forward stores nothing to shared memory
        assert r.per_cta["mma"] > 0 and r.per_cta["barriers"] > 0, r
    # Causal seqlen 128, one head: forward CTA m (64 rows) sees key tiles up to its diagonal;
    # hdim64 uses 128-key tiles: one tile each, 4 warps x (64/16 k-steps x 16 n-tiles for S +
    # 128/16 x 8 for PV) = 4 x 128 = 512 mma per CTA.
    assert rows["flash_fwd_kernel<hdim64, fp16>"].per_cta["mma"] == 512
    for name, r in rows.items():
        if name.startswith(("adam_kernel", "rotary_kernel")):
            assert r.gld_sectors_per_request == pytest.approx(r.gld_ideal_per_request), r


def test_cuda_flash_attention_kernels(cuda_kernels):
    """Every flash attention instantiation (fwd/bwd x head_dim 64/128 x fp16/bf16) is compiled
    for sm_80 and sm_90a, runs on tensor cores (HMMA in the SASS), and one CTA fits an SM with
    the dynamic shared memory its launch plan asks for (the plan comes from the host code)."""
    import torch

    flash = [k for k in cuda_kernels if "flash_fwd_kernel" in k.name or "flash_bwd_kernel" in k.name]
    for arch in ("sm_80", "sm_90a"):
        names = {k.name for k in flash if k.arch == arch}
        assert len(names) == 8, sorted(names)
    for k in flash:
        head_dim = 64 if "traits<64>" in k.name else 128
        backward = "flash_bwd_kernel" in k.name
        dtype = torch.bfloat16 if "bfloat16" in k.name else torch.float16
        q = torch.randn(1, 256, 2, head_dim, dtype=dtype)
        lse = torch.empty(1, 2, 256)
        options = FlashAttnArgs(max_seqlen_q=0, max_seqlen_k=0, softmax_scale=1.0).positional()
        *_, threads, smem = torch.ops.phi_kernels.flash_attn_cuda_plan(q, q, q, *options, q, lse, backward)
        assert k.hmma > 0, f"{k.name} {k.arch}: no tensor-core instructions"
        assert k.spill_bytes == 0 and k.ldl_stl == 0, k
        assert k.shared + smem <= pk_inspect.SM_LIMITS[k.arch]["smem_per_block"], (k, smem)
        assert k.max_warps_per_sm(threads, smem) >= threads // 32, f"{k.name} {k.arch}: no CTA fits an SM"
