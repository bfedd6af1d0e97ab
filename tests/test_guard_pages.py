"""The CPU kernels never touch memory past their tensors: every input and output of a call is
placed so that it ends exactly at a PROT_NONE guard page (and starts right after one), and the
kernels run over odd shapes whose tails end there. A read or write one element too far is a
segmentation fault, which kills the subprocess that runs the cases and fails this test.
(The CUDA kernels get the same check from the SIMT emulator, which bounds-checks every access.)
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from phi_kernels import backend_status
from tests.guard_pages import GUARDED_PREAMBLE

pytestmark = pytest.mark.skipif(not backend_status("cpu", "cpu").available or sys.platform != "linux",
                                reason="needs the CPU kernels on Linux (mmap / mprotect)")

SCRIPT = GUARDED_PREAMBLE + textwrap.dedent(r'''
    from phi_kernels import FusedAdam, apply_rotary, flash_attn_func, flash_attn_varlen_func, rotary_cos_sin

    torch.manual_seed(0)
    # Rotary: in place and out of place, dense and packed, tails that end at the guard.
    for shape, rd in (((2, 19, 3, 64), 32), ((1, 7, 5, 80), 32), ((3, 5, 2, 64), 64)):
        x = torch.randn(shape)
        cos, sin = rotary_cos_sin(shape[1] + 3, rd)
        ref = apply_rotary(x, cos, sin, seqlen_offsets=3, backend="ref")
        gx, gcos, gsin = guarded(x), guarded(cos), guarded(sin)
        out = apply_rotary(gx, gcos, gsin, seqlen_offsets=3, backend="cpu")
        assert torch.allclose(out, ref, atol=1e-5), "rotary out-of-place"
        apply_rotary(gx, gcos, gsin, seqlen_offsets=3, inplace=True, backend="cpu")
        assert torch.allclose(gx, ref, atol=1e-5), "rotary in-place"
    packed = torch.randn(23, 2, 64)
    cu = torch.tensor([0, 5, 6, 23], dtype=torch.int32)
    cos, sin = rotary_cos_sin(32, 32)
    ref = apply_rotary(packed, cos, sin, cu_seqlens=cu, max_seqlen=17, backend="ref")
    out = apply_rotary(guarded(packed), guarded(cos), guarded(sin), cu_seqlens=guarded(cu), max_seqlen=17, backend="cpu")
    assert torch.allclose(out, ref, atol=1e-5), "rotary varlen"

    # Flash attention forward + backward: seqlens that are not multiples of the 64-row tiles,
    # GQA, dense and packed, fp32 and bf16.
    for dtype in (torch.float32, torch.bfloat16):
        for sq, sk, h, hkv, d in ((1, 1, 2, 2, 64), (17, 70, 4, 2, 80), (130, 67, 2, 1, 64)):
            q, k, v = (torch.randn(2, s, n, d).to(dtype) for s, n in ((sq, h), (sk, hkv), (sk, hkv)))
            dout = torch.randn(2, sq, h, d).to(dtype)
            gq, gk, gv = (guarded(t).requires_grad_() for t in (q, k, v))
            out = flash_attn_func(gq, gk, gv, causal=True, backend="cpu")
            out.backward(guarded(dout))
            rq, rk, rv = (t.clone().requires_grad_() for t in (q, k, v))
            ref = flash_attn_func(rq, rk, rv, causal=True, backend="ref")
            ref.backward(dout)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert torch.allclose(out.float(), ref.float(), atol=tol), ("flash out", dtype, sq, sk)
            for g, r in ((gq.grad, rq.grad), (gk.grad, rk.grad), (gv.grad, rv.grad)):
                assert torch.allclose(g.float(), r.float(), atol=tol * 10), ("flash grad", dtype, sq, sk)
    lq, lk = [5, 1, 37], [9, 1, 40]
    cq = torch.tensor([0, 5, 6, 43], dtype=torch.int32)
    ck = torch.tensor([0, 9, 10, 50], dtype=torch.int32)
    q, k, v = torch.randn(43, 4, 64), torch.randn(50, 2, 64), torch.randn(50, 2, 64)
    out = flash_attn_varlen_func(guarded(q), guarded(k), guarded(v), guarded(cq), guarded(ck), 37, 40, causal=True,
                                 backend="cpu")
    ref = flash_attn_varlen_func(q, k, v, cq, ck, 37, 40, causal=True, backend="ref")
    assert torch.allclose(out, ref, atol=1e-4), "flash varlen"

    # FusedAdam: params, grads and state flush against guards, sizes with vector tails.
    for dtype, master in ((torch.float32, False), (torch.bfloat16, True)):
        ps = [guarded(torch.randn(n).to(dtype)).requires_grad_() for n in (1, 7, 4097, 65537)]
        refs = [p.detach().clone().float().requires_grad_() for p in ps]
        opt = FusedAdam(ps, lr=1e-2, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1, master_weights=master, backend="cpu")
        ref_opt = torch.optim.AdamW(refs, lr=1e-2, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)
        for _ in range(3):
            for p, r in zip(ps, refs):
                g = torch.randn(p.shape)
                p.grad = guarded(g.to(dtype))
                r.grad = g.to(dtype).float()
            opt.step()
            ref_opt.step()
        for p, r in zip(ps, refs):
            assert torch.allclose(p.float(), r, atol=2e-2 if dtype != torch.float32 else 1e-5), "adam"
    print("ALL GUARDED CASES PASSED")
''')


def test_cpu_kernels_stay_inside_their_tensors():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"exit code {proc.returncode} (-11 = a kernel touched a guard page)\n{proc.stdout}\n{proc.stderr[-4000:]}")
    assert "ALL GUARDED CASES PASSED" in proc.stdout


def test_the_guard_pages_fault():
    """The harness itself: reading one byte past a guarded tensor kills the process."""
    code = GUARDED_PREAMBLE + textwrap.dedent('''
        t = guarded(torch.randn(1000))
        print("reading past the end", flush=True)
        ctypes.string_at(t.data_ptr() + t.numel() * 4, 1)
        print("not reached")
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -11 and "reading past the end" in proc.stdout and "not reached" not in proc.stdout, proc
