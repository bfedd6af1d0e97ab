"""The CPU kernels are compiled for the x86-64 baseline, AVX2 and AVX-512 (csrc/cpu_isa) and the
running CPU picks the best, or PHI_KERNELS_CPU_CAPABILITY forces one: every capability this
machine supports runs every CPU kernel (rotary, FusedAdam, flash attention forward + backward)
against the reference, so no ISA path rots on a machine that would never pick it. A capability
the machine lacks is skipped with the reason."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from phi_kernels import FusedAdam, apply_rotary, backend_status, flash_attn_func, rotary_cos_sin

pytestmark = pytest.mark.skipif(not backend_status("cpu", "cpu").available, reason="needs the CPU kernels")
CAPABILITIES = ("baseline", "avx2", "avx512")


def _supported() -> list[str]:
    return list(torch.ops.phi_kernels.cpu_capabilities()) if backend_status("cpu", "cpu").available else []


@pytest.fixture(params=CAPABILITIES)
def capability(request, monkeypatch):
    if request.param not in _supported():
        pytest.skip(f"this CPU lacks {request.param} (it supports {', '.join(_supported())})")
    monkeypatch.setenv("PHI_KERNELS_CPU_CAPABILITY", request.param)
    assert torch.ops.phi_kernels.cpu_capability() == request.param
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary(capability, dtype):
    x = torch.randn(2, 37, 3, 80).to(dtype)
    cos, sin = rotary_cos_sin(64, 32, dtype=dtype)
    ref = apply_rotary(x, cos, sin, seqlen_offsets=5, backend="ref")
    out = apply_rotary(x, cos, sin, seqlen_offsets=5, backend="cpu")
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-master"])
def test_fused_adam(capability, dtype, master):
    torch.manual_seed(0)
    shapes = [(1,), (7,), (4097,), (33, 65)]
    ours = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    theirs = [p.detach().float().clone().requires_grad_() for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)
    opt = FusedAdam(ours, master_weights=master, backend="cpu", **kw)
    ref = torch.optim.AdamW(theirs, **kw)
    for _ in range(5):
        for p, r in zip(ours, theirs):
            g = torch.randn(p.shape)
            p.grad, r.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        ref.step()
    for p, r in zip(ours, theirs):
        ours_fp32 = opt.state[p]["master_param"] if master else p.detach()
        torch.testing.assert_close(ours_fp32.float(), r.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sq,sk,hkv,d", [(1, 70, 2, 64), (130, 67, 1, 80), (65, 65, 2, 64)])
def test_flash_attention(capability, sq, sk, hkv, d):
    q = torch.randn(2, sq, 2, d, requires_grad=True)
    k, v = (torch.randn(2, sk, hkv, d, requires_grad=True) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=True, backend="cpu")
    ref = flash_attn_func(q, k, v, causal=True, backend="ref")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_best_capability_by_default_and_refusals(monkeypatch):
    monkeypatch.delenv("PHI_KERNELS_CPU_CAPABILITY", raising=False)
    supported = _supported()
    assert supported[0] == "baseline" and torch.ops.phi_kernels.cpu_capability() == supported[-1]
    assert supported[-1] in backend_status("cpu", "cpu").reason
    monkeypatch.setenv("PHI_KERNELS_CPU_CAPABILITY", "sse9")
    with pytest.raises(RuntimeError, match="PHI_KERNELS_CPU_CAPABILITY=sse9 is not a capability"):
        apply_rotary(torch.randn(1, 4, 1, 64), *rotary_cos_sin(4, 32), backend="cpu")
    if "avx512" not in supported:
        monkeypatch.setenv("PHI_KERNELS_CPU_CAPABILITY", "avx512")
        with pytest.raises(RuntimeError, match="this CPU does not support it"):
            apply_rotary(torch.randn(1, 4, 1, 64), *rotary_cos_sin(4, 32), backend="cpu")


# An AVX (VEX) or AVX-512 (EVEX) instruction: a ymm/zmm/mask register, or a v-prefixed mnemonic
# (vmovss and the like use xmm only). verr/verw are old system instructions, not AVX.
_WIDE = re.compile(r"%[yz]mm|%k[1-7]\b|^\s*[0-9a-f]+:\s+v(?!err|erw)[a-z]", re.M)


def _functions(path: str) -> list[tuple[str, str]]:
    """(mangled name, disassembly) of every function in a shared library."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    blocks = re.split(r"\n(?=[0-9a-f]+ <)", out)
    return [(m.group(1), b) for b in blocks if (m := re.match(r"[0-9a-f]+ <([^>]+)>:", b))]


def test_extension_is_not_built_for_the_build_machine_only():
    """Outside csrc/cpu_isa's AVX2 / AVX-512 wrappers, nothing is compiled beyond the x86-64
    baseline, so the extension loads and runs on any x86-64 CPU. Two checks on the built library:
    - the op bindings (glue) have no AVX instruction;
    - every function another object file could bind to (external or weak linkage, `nm` T/W) that
      holds an AVX / AVX-512 instruction is a per-ISA entry point (..._avx2 / ..._avx512), which
      only the cpuid dispatch calls. This is the hazard of per-file ISA flags: an inline function
      or template instantiated in a wide file is a weak symbol, and the linker may keep the wide
      copy for every caller, baseline ones included (an illegal instruction on an older CPU)."""
    import shutil

    import phi_kernels._C as ext

    if shutil.which("objdump") is None or shutil.which("nm") is None:
        pytest.skip("needs objdump and nm (binutils)")
    functions = _functions(ext.__file__)
    glue = [b for name, b in functions
            if re.match(r"_ZN3phi12_GLOBAL__N_1\d+(rotary_kernel_cpu|adam_step_cpu|flash_attn_fwd_cpu)", name)]
    assert glue, "glue functions not found in the symbol table"
    for b in glue:
        assert not _WIDE.search(b), b.splitlines()[0]

    symbols = subprocess.run(["nm", ext.__file__], capture_output=True, text=True, check=True).stdout
    binding = {f[2]: f[1] for f in (line.split() for line in symbols.splitlines()) if len(f) == 3}
    wide = [name for name, b in functions if _WIDE.search(b)]
    assert any(n.endswith("_avx512ERKNS_13Flash_paramsE") or "avx512" in n for n in wide), \
        "no AVX-512 kernel found: the scan is not seeing the per-ISA code"
    exported = [n for n in wide if binding.get(n) in ("T", "W", "V", "i")]
    leaked = [n for n in exported if not re.search(r"_avx2|_avx512", n)]
    assert not leaked, f"wide code any caller may bind to, outside the per-ISA entry points: {leaked[:5]}"
    assert sys.platform == "linux"
