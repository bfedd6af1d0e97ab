"""Bad input to the rotary and attention ops (issue 18): every bad argument is refused with an
error that names it, before anything is written (the caller's tensors, and the memory around
them, are byte-identical after a failed call); the C++ ops check the bounds they index with
themselves; nothing aborts the process; and one rule for non-finite inputs holds on every
backend (flash_math.h, phi_kernels/reference/flash_attn.py):

    a key a row cannot see (causal / window / seqused_k / another sequence) never affects that
    row, whatever its k and v hold; a NaN the row sees, in its q or in the k of a visible key,
    makes the whole output row and its LSE NaN; a NaN in v[j, c] of a visible key j makes
    out[row, c] NaN; nothing else becomes NaN.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi_kernels import (BackendUnavailableError, apply_rotary, apply_rotary_qkv, flash_attn_func,
                         flash_attn_varlen_func, flash_attn_with_kvcache, rotary_cos_sin)
from phi_kernels.flash_attn import FlashAttnArgs
from phi_kernels.reference import apply_rotary_ref, flash_attn_ref
from phi_kernels.rotary import RotaryArgs
from tests.conftest import CUDA_KERNELS, DEVICE, kernel_backends, subprocess_env

ALL = kernel_backends() + ["ref"]
# The C++ ops called directly, on CPU tensors: the CPU kernels, and the CUDA glue + kernels under
# the SIMT emulator (same schemas, namespace phi_kernels_emu).
CPP = [p for p in kernel_backends("cpu") if p.values[0] in ("cpu", "cuda-emu")]
INT32_MAX = 2**31 - 1
NAN, INF = float("nan"), float("inf")

_HYP = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _snapshot(*ts):
    return [t.detach().clone() for t in ts]


def _unchanged(ts, snaps) -> bool:
    """Byte-identical (NaN-safe: compares the bytes, not the values)."""
    return all(torch.equal(t.detach().contiguous().view(torch.uint8), s.contiguous().view(torch.uint8))
               for t, s in zip(ts, snaps))


def _cpp_ops(backend):
    return torch.ops.phi_kernels_emu if backend == "cuda-emu" else torch.ops.phi_kernels


def _attn_dtype(backend):
    """The CUDA kernels take fp16/bf16 only; the rest run fp32 here."""
    return torch.float16 if backend in CUDA_KERNELS else torch.float32


# =============================================================================== rotary

ROWS = 8


def _rotary_inputs(dtype=torch.float32):
    """A packed x of ROWS rows in the middle of a parent buffer with guard rows on both sides:
    a kernel that writes past x shows up as a changed guard row."""
    parent = torch.randn(ROWS + 6, 2, 64, device=DEVICE).to(dtype)
    x = parent[3:3 + ROWS]
    cos, sin = rotary_cos_sin(32, 32, device=DEVICE, dtype=dtype)
    return parent, x, cos, sin


BAD_CU_SEQLENS = {
    "past the rows (wrote out of bounds)": [0, 3, 10],
    "short of the rows (tail left unwritten)": [0, 3, 6],
    "not starting at 0": [1, 3, 8],
    "starting below 0": [-2, 3, 8],
    "decreasing": [0, 5, 3, 8],
    "one sequence past, then back": [0, 9, 8],
    "int32 max": [0, INT32_MAX, 8],
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("cu", list(BAD_CU_SEQLENS.values()), ids=list(BAD_CU_SEQLENS))
def test_rotary_cu_seqlens_must_cover_the_rows_exactly(backend, inplace, cu):
    parent, x, cos, sin = _rotary_inputs()
    snaps = _snapshot(parent, cos, sin)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, be non-decreasing and end at 8"):
        apply_rotary(x, cos, sin, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE), max_seqlen=16,
                     inplace=inplace, backend=backend)
    assert _unchanged((parent, cos, sin), snaps)


BAD_MAX_SEQLEN = {"below the longest": (3, "max_seqlen=3 is smaller than the longest sequence in cu_seqlens"),
                  "negative": (-1, "max_seqlen must be"), "2**31": (2**31, "max_seqlen must be"),
                  "bool": (True, "max_seqlen must be"), "float": (5.0, "max_seqlen must be"),
                  "str": ("8", "max_seqlen must be"), "missing": (None, "max_seqlen must be")}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("value,match", list(BAD_MAX_SEQLEN.values()), ids=list(BAD_MAX_SEQLEN))
def test_rotary_bad_max_seqlen(backend, value, match):
    parent, x, cos, sin = _rotary_inputs()
    snaps = _snapshot(parent)
    with pytest.raises(ValueError, match=match):
        apply_rotary(x, cos, sin, cu_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32, device=DEVICE),
                     max_seqlen=value, inplace=True, backend=backend)
    assert _unchanged((parent,), snaps)


@pytest.mark.parametrize("backend", ALL)
def test_rotary_max_seqlen_far_above_the_longest_is_fine(backend):
    """flash-attention accepts any max_seqlen >= the longest sequence; the kernels are given the
    longest (read back from cu_seqlens), so 2**31 - 1 costs nothing (no huge grid or loop)."""
    parent, x, cos, sin = _rotary_inputs()
    cu = torch.tensor([0, 5, 5, 8], dtype=torch.int32, device=DEVICE)
    out = apply_rotary(x, cos, sin, cu_seqlens=cu, max_seqlen=INT32_MAX, seqlen_offsets=2, backend=backend)
    torch.testing.assert_close(out, apply_rotary_ref(x, cos, sin, cu_seqlens=cu, seqlen_offsets=2))


@pytest.mark.parametrize("backend", ALL)
def test_rotary_inplace_refuses_expanded_x(backend):
    """A stride-0 x has one memory location per several elements: rotating it in place rotated
    each location once per alias. Refused (torch's rule for in-place ops); out of place is fine."""
    base = torch.randn(2, 1, 2, 64, device=DEVICE)
    x = base.expand(2, 5, 2, 64)
    cos, sin = rotary_cos_sin(8, 32, device=DEVICE)
    snaps = _snapshot(base)
    with pytest.raises(ValueError, match="inplace=True needs an x whose elements have distinct memory locations"):
        apply_rotary(x, cos, sin, inplace=True, backend=backend)
    qkv = torch.randn(1, 1, 3, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="distinct memory locations"):
        apply_rotary_qkv(qkv.expand(2, 4, 3, 2, 64), cos, sin, inplace=True, backend=backend)
    assert _unchanged((base,), snaps)
    torch.testing.assert_close(apply_rotary(x, cos, sin, backend=backend), apply_rotary_ref(x.contiguous(), cos, sin))


@pytest.mark.parametrize("backend", ALL)
def test_rotary_inplace_refuses_x_sharing_memory_with_cos(backend):
    buf = torch.randn(2 * 4 * 2 * 64 + 64, device=DEVICE)
    x = buf[:2 * 4 * 2 * 64].view(2, 4, 2, 64)
    cos = buf[-8 * 16 - 32:-32].view(8, 16)  # its first 32 elements are x's last ones
    sin = torch.randn(8, 16, device=DEVICE)
    snaps = _snapshot(buf)
    with pytest.raises(ValueError, match="x shares memory with cos"):
        apply_rotary(x, cos, sin, inplace=True, backend=backend)
    assert _unchanged((buf,), snaps)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("value", [-1, True, 2.0, "1", None], ids=str)
def test_rotary_bad_seqlen_offsets(backend, value):
    parent, x, cos, sin = _rotary_inputs()
    with pytest.raises(ValueError, match="seqlen_offsets must be"):
        apply_rotary(x.view(1, ROWS, 2, 64), cos, sin, seqlen_offsets=value, backend=backend)


def _hyp_cu_case(backend, max_examples):
    @settings(max_examples=max_examples, **_HYP)
    @given(lengths=st.lists(st.integers(-3, 6), min_size=1, max_size=4), start=st.sampled_from([0, 0, 0, 1, -1]),
           rows=st.integers(0, 12), max_seqlen=st.integers(0, 8), inplace=st.booleans())
    def check(lengths, start, rows, max_seqlen, inplace):
        cu = [start]
        for n in lengths:
            cu.append(cu[-1] + n)
        parent = torch.randn(rows + 4, 2, 64, device=DEVICE)
        x, snaps = parent[2:2 + rows], _snapshot(parent)
        cos, sin = rotary_cos_sin(16, 32, device=DEVICE)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        valid = cu[0] == 0 and all(n >= 0 for n in lengths) and cu[-1] == rows
        if valid and max(lengths) <= max_seqlen:
            expect = apply_rotary_ref(x, cos, sin, cu_seqlens=cu_t)
            out = apply_rotary(x, cos, sin, cu_seqlens=cu_t, max_seqlen=max_seqlen, inplace=inplace, backend=backend)
            torch.testing.assert_close(out, expect)
            assert _unchanged((parent[:2], parent[2 + rows:]), (snaps[0][:2], snaps[0][2 + rows:]))
            return
        with pytest.raises(ValueError, match="cu_seqlens"):  # both messages name it
            apply_rotary(x, cos, sin, cu_seqlens=cu_t, max_seqlen=max_seqlen, inplace=inplace, backend=backend)
        assert _unchanged((parent,), snaps)

    check()


@pytest.mark.parametrize("backend", ALL)
def test_rotary_hypothesis_cu_seqlens(backend):
    """Random cu_seqlens, good and bad, against random row counts: a good one rotates like the
    reference and writes nothing outside x, a bad one is refused and nothing changes."""
    _hyp_cu_case(backend, 15 if backend == "triton" else 40)


# --------------------------------------------------------------------------- the C++ op itself


def _rotary_op(backend, x, cos, sin, cu, out, max_seqlen=16, offsets=None, offset=0):
    args = RotaryArgs(seqlen_offsets=offsets, seqlen_offset=offset, cu_seqlens=cu, max_seqlen=max_seqlen)
    return _cpp_ops(backend).rotary_out(x, cos, sin, *args.positional(), out)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("cu,match", [([0, 3, 10], "cu_seqlens must end at the 8 rows of x, got 10"),
                                      ([0, 3, 6], "cu_seqlens must end at the 8 rows of x, got 6"),
                                      ([2, 3, 8], "cu_seqlens must start at 0"),
                                      ([0, 9, 8], r"cu_seqlens must stay within the 8 rows of x, sequence 0 "
                                                  r"covers rows \[0, 9\)")],
                         ids=["past", "short", "start", "decreasing"])
def test_rotary_cpp_op_checks_cu_seqlens(backend, cu, match):
    """The op checks the rows it indexes itself (host memory), whoever calls it."""
    parent = torch.randn(ROWS + 6, 2, 64)
    x, out_parent = parent[3:3 + ROWS], torch.randn(ROWS + 6, 2, 64)
    cos, sin = rotary_cos_sin(32, 32)
    snaps = _snapshot(parent, out_parent)
    with pytest.raises(RuntimeError, match=match):
        _rotary_op(backend, x, cos, sin, torch.tensor(cu, dtype=torch.int32), out_parent[3:3 + ROWS])
    with pytest.raises(RuntimeError, match=match):  # in place
        _rotary_op(backend, x, cos, sin, torch.tensor(cu, dtype=torch.int32), x)
    assert _unchanged((parent, out_parent), snaps)


@pytest.mark.parametrize("backend", CPP)
def test_rotary_cpp_op_checks_out_and_positions(backend):
    cos, sin = rotary_cos_sin(8, 32)
    x = torch.randn(2, 4, 2, 64)
    cases = [
        (x.clone(), torch.randn(2, 1, 2, 64).expand(2, 4, 2, 64), "out has elements sharing one memory location"),
        (*(lambda b: (b[:, :4], b[:, 1:]))(torch.randn(2, 5, 2, 64)), "out overlaps x without being x"),
        (x.clone(), x.clone().transpose(0, 1).contiguous().transpose(0, 1), None),  # a fine strided out
    ]
    for xi, out, match in cases:
        if match is None:
            _rotary_op(backend, xi, cos, sin, None, out, max_seqlen=4)
            torch.testing.assert_close(out, apply_rotary_ref(xi, cos, sin))
            continue
        snaps = _snapshot(xi, out)
        with pytest.raises(RuntimeError, match=match):
            _rotary_op(backend, xi, cos, sin, None, out, max_seqlen=4)
        assert _unchanged((xi, out), snaps)
    with pytest.raises(RuntimeError, match="seqlen_offsets: sequence 1 needs cos/sin rows"):
        _rotary_op(backend, x, cos, sin, None, torch.empty_like(x), max_seqlen=4,
                   offsets=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="max_seqlen must be in"):
        _rotary_op(backend, x[0], cos, sin, torch.tensor([0, 4], dtype=torch.int32), torch.empty_like(x[0]),
                   max_seqlen=2**31)
    # max_seqlen far above the longest: the kernel runs the longest (no 2**31-token loop or grid).
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    out = torch.empty_like(x[0])
    _rotary_op(backend, x[0], cos, sin, cu, out, max_seqlen=INT32_MAX)
    torch.testing.assert_close(out, apply_rotary_ref(x[0], cos, sin, cu_seqlens=cu))


# =============================================================================== flash attention


def _qkv(backend, b=1, sq=8, sk=8, heads=2, kv_heads=2, d=64):
    dt = _attn_dtype(backend)
    mk = lambda *s: torch.randn(*s, device=DEVICE).to(dt)  # noqa: E731
    return mk(b, sq, heads, d), mk(b, sk, kv_heads, d), mk(b, sk, kv_heads, d)


BAD_SCALARS = [
    ("softcap", INF), ("softcap", NAN), ("softcap", -1.0), ("softcap", 1e39), ("softcap", "30"), ("softcap", None),
    ("softmax_scale", INF), ("softmax_scale", NAN), ("softmax_scale", 0.0), ("softmax_scale", -0.125),
    ("softmax_scale", 1e-50), ("softmax_scale", 1e39), ("softmax_scale", "0.1"),
    ("window_size", None), ("window_size", (1,)), ("window_size", (0.5, 1)), ("window_size", (-2, 0)),
    ("window_size", (0, 2**31)), ("window_size", (True, 0)), ("window_size", "ab"),
]
BAD_DROPOUT = [NAN, INF, -0.1, 1.0, "0.1", None]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("arg,value", BAD_SCALARS + [("dropout_p", v) for v in BAD_DROPOUT],
                         ids=[f"{a}={v!r}" for a, v in BAD_SCALARS] + [f"dropout_p={v!r}" for v in BAD_DROPOUT])
def test_attention_bad_scalars(backend, arg, value):
    """softcap finite >= 0, softmax_scale finite > 0 (both also as the float32 the kernels
    take), dropout_p in [0, 1), window_size two ints >= -1: refused, the message naming it."""
    q, k, v = _qkv(backend)
    with pytest.raises(ValueError, match=arg):
        flash_attn_func(q, k, v, **{arg: value}, backend=backend)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=arg):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, **{arg: value}, backend=backend)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("scale,softcap,match", [
    (INF, 0.0, "softmax_scale must be finite and > 0"), (NAN, 0.0, "softmax_scale must be finite and > 0"),
    (-1.0, 0.0, "softmax_scale must be finite and > 0"), (0.125, INF, "softcap must be finite and >= 0"),
    (0.125, NAN, "softcap must be finite and >= 0"), (0.125, -1.0, "softcap must be finite and >= 0"),
    (1e-50, 0.0, "softmax_scale and softcap must be representable"), (0.125, 1e39, "representable"),
], ids=["scale inf", "scale nan", "scale -1", "softcap inf", "softcap nan", "softcap -1", "scale 1e-50",
        "softcap 1e39"])
def test_attention_cpp_op_checks_scalars(backend, scale, softcap, match):
    q = torch.randn(1, 8, 2, 64).half()
    out, lse = torch.empty_like(q), torch.empty(1, 2, 8)
    snaps = _snapshot(out)
    with pytest.raises(RuntimeError, match=match):
        args = FlashAttnArgs(max_seqlen_q=8, max_seqlen_k=8, softmax_scale=scale, softcap=softcap)
        _cpp_ops(backend).flash_attn_forward_out(q, q, q, *args.positional(), out, lse)
    assert _unchanged((out,), snaps)


BAD_VARLEN_MAX = {"2**31": (2**31, "must be an int in"), "negative": (-1, "must be an int in"),
                  "bool": (True, "must be an int in"), "float": (5.0, "must be an int in"),
                  "str": ("8", "must be an int in"), "None": (None, "must be an int in"),
                  "below the longest": (4, "4 is below the longest sequence")}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("value,match", list(BAD_VARLEN_MAX.values()), ids=list(BAD_VARLEN_MAX))
def test_attention_bad_max_seqlen(backend, which, value, match):
    q, k, v = (t[0] for t in _qkv(backend))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    mx = dict(q=5, k=5)
    mx[which] = value
    with pytest.raises(ValueError, match=f"max_seqlen_{which} {match}"):
        flash_attn_varlen_func(q, k, v, cu, cu, mx["q"], mx["k"], backend=backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("cu", list(BAD_CU_SEQLENS.values()), ids=list(BAD_CU_SEQLENS))
def test_attention_bad_cu_seqlens(backend, which, cu):
    q, k, v = (t[0] for t in _qkv(backend))
    good = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    bad = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    if len(cu) != 3:  # a different batch is its own error; keep the other one in step
        good = torch.tensor([0, 3, 5, 8], dtype=torch.int32, device=DEVICE)
    cus = dict(q=good, k=good)
    cus[which] = bad
    with pytest.raises(ValueError, match=f"cu_seqlens_{which} must start at 0, be non-decreasing and end at 8"):
        flash_attn_varlen_func(q, k, v, cus["q"], cus["k"], 16, 16, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_attention_max_seqlen_far_above_the_longest(backend):
    """max_seqlen = 2**31 - 1 aborted the process (std::length_error from a buffer sized by it,
    thrown inside an OpenMP region). flash-attention accepts any max_seqlen >= the longest
    sequence: so do we, and the kernels are sized by the longest."""
    q, k, v = (t[0] for t in _qkv(backend, sq=8, sk=11))
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 6, 11], dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, INT32_MAX, INT32_MAX, causal=True, backend=backend)
    ref = flash_attn_ref(q.double(), k.double(), v.double(), softmax_scale=1 / 8, window_size=(-1, 0),
                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", CPP)
def test_attention_cpp_op_huge_max_seqlen_and_bad_cu_seqlens(backend):
    q = torch.randn(8, 2, 64).half()
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    ops = _cpp_ops(backend)
    out, lse = torch.empty_like(q), torch.empty(2, 8)

    def options(max_q=16, max_k=16, cu_q=cu, seqused_k=None):
        return FlashAttnArgs(cu_seqlens_q=cu_q, cu_seqlens_k=cu, seqused_k=seqused_k, max_seqlen_q=max_q,
                             max_seqlen_k=max_k, softmax_scale=0.125).positional()

    if backend == "cpu":  # sized by the longest sequence (it was: a 2**31-float buffer, an abort)
        ops.flash_attn_forward_out(q, q, q, *options(INT32_MAX, INT32_MAX), out, lse)
        ref = flash_attn_ref(q, q, q, softmax_scale=0.125, cu_seqlens_q=cu, cu_seqlens_k=cu)[0]
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    else:  # the CUDA glue sizes its grid by max_seqlen (no host read of cu_seqlens): a clean error
        # (the public API passes the longest sequence instead, tested above)
        with pytest.raises(RuntimeError, match="exceeds"):
            ops.flash_attn_forward_out(q, q, q, *options(INT32_MAX, INT32_MAX), out, lse)
    with pytest.raises(RuntimeError, match="max_seqlen_q and max_seqlen_k must be in"):
        ops.flash_attn_forward_out(q, q, q, *options(2**31, 8), out, lse)
    if backend == "cpu":
        dq, dk, dv = (torch.empty_like(q) for _ in range(3))
        ops.flash_attn_backward_out(torch.randn_like(q), q, q, q, out, lse, *options(INT32_MAX, INT32_MAX), dq, dk, dv)
        assert torch.isfinite(dq).all()
    # cu_seqlens and seqused_k in host memory are checked by the glue itself (on a GPU it cannot
    # read them without a sync: the Python API checks them there).
    snaps = _snapshot(out, lse)
    for bad, match in (([0, 3, 6], "cu_seqlens_q must end at the 8 rows of q, got 6"),
                       ([1, 3, 8], "cu_seqlens_q must start at 0"),
                       ([0, 9, 8], "cu_seqlens_q must be non-decreasing")):
        with pytest.raises(RuntimeError, match=match):
            ops.flash_attn_forward_out(q, q, q, *options(cu_q=torch.tensor(bad, dtype=torch.int32)), out, lse)
    with pytest.raises(RuntimeError, match=r"seqused_k\[1\] = 6 must be in \[0, 5\]"):
        ops.flash_attn_forward_out(q, q, q, *options(seqused_k=torch.tensor([3, 6], dtype=torch.int32)), out, lse)
    assert _unchanged((out, lse), snaps)


_ALLOC_FAILURE_SCRIPT = r"""
import resource, sys, torch, phi_kernels
L = 2**17
q, k, v = (torch.randn(L, 1, 64).half() for _ in range(3))
cu = torch.tensor([0, L], dtype=torch.int32)
out, lse = torch.empty_like(q), torch.empty(1, L)
from phi_kernels.flash_attn import FlashAttnArgs
ops = torch.ops.phi_kernels
options = FlashAttnArgs(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=L, max_seqlen_k=L, softmax_scale=0.125,
                        window_left=0, window_right=0).positional()
ops.flash_attn_forward_out(q, k, v, *options, out, lse)  # starts the OpenMP threads
dout = torch.randn_like(q)
dq, dk, dv = (torch.empty_like(q) for _ in range(3))
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
# Room for less than one thread's backward buffers (~5 * L * 64 floats): their allocation fails
# inside the OpenMP region, where an escaping exception is std::terminate.
resource.setrlimit(resource.RLIMIT_AS, (vm + 100 * 2**20, resource.RLIM_INFINITY))
try:  # the window (0, 0) keeps the work linear in L if the buffers do fit
    ops.flash_attn_backward_out(dout, q, k, v, out, lse, *options, dq, dk, dv)
    print("ran")
except MemoryError as e:
    print("MemoryError", e)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
@pytest.mark.parametrize("backend", [p for p in CPP if p.values[0] == "cpu"])
def test_attention_cpu_allocation_failure_is_an_error_not_an_abort(backend):
    """An exception thrown inside an OpenMP region terminates the process (what max_seqlen =
    2**31 - 1 did, through std::length_error). The CPU kernels catch it in the region and rethrow
    it on the calling thread: a bad_alloc is a MemoryError. Run in a child process with its
    address space capped."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _ALLOC_FAILURE_SCRIPT], capture_output=True, text=True, timeout=120,
                         env=subprocess_env())
    assert res.returncode == 0, f"the process died (rc {res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.startswith(("MemoryError", "ran")), res.stdout + res.stderr[-2000:]


# --------------------------------------------------------------------------- KV cache: no write on failure


def _kv_inputs(backend, d=64, heads=4):
    dt = _attn_dtype(backend)
    mk = lambda *s: torch.randn(*s, device=DEVICE).to(dt)  # noqa: E731
    return dict(q=mk(2, 1, heads, d), k_cache=mk(2, 8, 2, d), v_cache=mk(2, 8, 2, d), k=mk(2, 1, 2, d),
                v=mk(2, 1, 2, d), cache_seqlens=torch.tensor([3, 7], dtype=torch.int32, device=DEVICE))


def _kv_bad_cases():
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    cases = {  # name: (edit of the inputs, exception, match)
        "softcap inf": (lambda a: a.update(softcap=INF), ValueError, "softcap"),
        "softcap nan": (lambda a: a.update(softcap=NAN), ValueError, "softcap"),
        "softmax_scale inf": (lambda a: a.update(softmax_scale=INF), ValueError, "softmax_scale"),
        "softmax_scale 0": (lambda a: a.update(softmax_scale=0.0), ValueError, "softmax_scale"),
        "window": (lambda a: a.update(window_size=(-2, 0)), ValueError, "window_size"),
        "q dtype": (lambda a: a.update(q=a["q"].bfloat16()), ValueError, "q, k_cache, v_cache must share a dtype"),
        "head_dim 60": (lambda a: a.update({n: a[n][..., :60] for n in ("q", "k_cache", "v_cache", "k", "v")}),
                        ValueError, "head_dim must be a multiple of 8"),
        "heads 3 vs kv 2": (lambda a: a.update(q=a["q"][:, :, :3]), ValueError, "multiple of kv_heads"),
        "q strided head_dim": (lambda a: a.update(q=a["q"].repeat_interleave(2, -1)[..., ::2]), ValueError,
                               "q must be contiguous in head_dim"),
        "cache strided head_dim": (lambda a: a.update(v_cache=a["v_cache"].repeat_interleave(2, -1)[..., ::2]),
                                   ValueError, "v_cache must be contiguous in head_dim"),
        "cache_seqlens overflow": (lambda a: a.update(cache_seqlens=i32(3, 8)), ValueError, "cache_seqlens"),
        "cache_seqlens negative": (lambda a: a.update(cache_seqlens=i32(-1, 2)), ValueError, "cache_seqlens"),
        "cache_seqlens int overflow": (lambda a: a.update(cache_seqlens=8), ValueError, "cache_seqlens"),
        "cache_seqlens int64": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), ValueError,
                                "cache_seqlens"),
        "cache_seqlens bool": (lambda a: a.update(cache_seqlens=True), ValueError, "cache_seqlens"),
        "new k shape": (lambda a: a.update(k=a["k"][:, :, :1]), ValueError, "k and v must be"),
        "new v dtype": (lambda a: a.update(v=a["v"].double()), ValueError, "k and v must have the caches' dtype"),
        "new k not a tensor": (lambda a: a.update(k=1.0), ValueError, "k .* must be a Tensor"),
        "expanded k_cache": (lambda a: a.update(k_cache=a["k_cache"][:1].expand(2, 8, 2, a["k_cache"].shape[-1])),
                             ValueError, "k_cache has elements sharing one memory location"),
        "k_cache is v_cache": (lambda a: a.update(v_cache=a["k_cache"]), ValueError,
                               "k_cache shares memory with v_cache"),
        "new v inside v_cache": (lambda a: a.update(v=a["v_cache"][:, 6:7]), ValueError,
                                 "v_cache shares memory with v"),
        "requires grad": (lambda a: a.update(q=a["q"].clone().requires_grad_()), ValueError, "inference only"),
        "backend bogus": (lambda a: a.update(backend="bogus"), ValueError, "not a backend"),
    }
    if DEVICE == "cpu":
        cases["backend cuda on cpu tensors"] = (lambda a: a.update(backend="cuda"), BackendUnavailableError, "cuda")
    return cases


KV_BAD = _kv_bad_cases()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", list(KV_BAD))
def test_kvcache_failed_call_leaves_the_caches_untouched(backend, case):
    """flash_attn_with_kvcache wrote the new keys / values into the caches, then raised on a bad
    argument: now every argument is checked first, and a failed call changes no byte."""
    args = _kv_inputs(backend)
    args["backend"] = backend
    edit, exc, match = KV_BAD[case]
    edit(args)
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor)]
    snaps = _snapshot(*tensors)
    with pytest.raises(exc, match=match):
        with torch.no_grad() if case != "requires grad" else torch.enable_grad():
            flash_attn_with_kvcache(**args)
    assert _unchanged(tensors, snaps)


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.values[0] in CUDA_KERNELS])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.float16, 80)], ids=["fp32", "head_dim 80"])
def test_kvcache_unsupported_by_the_cuda_kernels_leaves_the_caches_untouched(backend, dtype, d):
    """A backend that cannot run the call (the CUDA kernels: fp16 / bf16, head_dim 64 / 128) is
    an error raised before the write."""
    args = {n: t.to(dtype) if t.is_floating_point() else t for n, t in _kv_inputs("cpu", d=d).items()}
    snaps = _snapshot(*args.values())
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match=backend):
        flash_attn_with_kvcache(**args, backend=backend)
    assert _unchanged(list(args.values()), snaps)


def _hyp_kvcache(backend, max_examples):
    @settings(max_examples=max_examples, **_HYP)
    @given(lens=st.lists(st.integers(-2, 10), min_size=2, max_size=2), new=st.integers(0, 3),
           as_int=st.booleans(), softcap=st.sampled_from([0.0, 5.0, -1.0, INF, NAN]),
           window=st.sampled_from([(-1, -1), (2, 0), (-2, 0)]))
    def check(lens, new, as_int, softcap, window):
        args = _kv_inputs(backend)
        args["k"], args["v"] = args["k"].repeat(1, new, 1, 1), args["v"].repeat(1, new, 1, 1)
        args["cache_seqlens"] = lens[0] if as_int else torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        used = [lens[0]] * 2 if as_int else lens
        ok = all(0 <= n and n + new <= 8 for n in used) and math.isfinite(softcap) and softcap >= 0 \
            and window != (-2, 0)
        kc, vc = _snapshot(args["k_cache"], args["v_cache"])
        with torch.no_grad():
            if not ok:
                with pytest.raises(ValueError, match="cache_seqlens|softcap|window_size"):
                    flash_attn_with_kvcache(**args, softcap=softcap, window_size=window, causal=True, backend=backend)
                assert _unchanged((args["k_cache"], args["v_cache"]), (kc, vc))
                return
            flash_attn_with_kvcache(**args, softcap=softcap, window_size=window, causal=True, backend=backend)
        for b, n in enumerate(used):  # exactly rows [n, n + new) of each cache row changed
            kc[b, n:n + new], vc[b, n:n + new] = args["k"][b], args["v"][b]
        assert _unchanged((args["k_cache"], args["v_cache"]), (kc, vc))

    check()


@pytest.mark.parametrize("backend", ALL)
def test_kvcache_hypothesis(backend):
    _hyp_kvcache(backend, {"triton": 10, "cuda-emu": 15}.get(backend, 50))


# --------------------------------------------------------------------------- non-finite inputs


def _visible(sq, sk, left, right):
    """Key j visible from row i (bottom-right aligned window, -1 unbounded)."""
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i + sk - sq - left
    if right >= 0:
        ok &= j <= i + sk - sq + right
    return ok


def _expected_nan(shape_q, sk, kv_heads, window, which, pos, head, col):
    """The NaN pattern of (out, lse) the rule gives for one NaN at q[0, pos, head, col] /
    k[0, pos, head, col] / v[0, pos, head, col]."""
    b, sq, heads, d = shape_q
    vis = _visible(sq, sk, *window)
    out = torch.zeros(b, sq, heads, d, dtype=torch.bool)
    lse = torch.zeros(b, heads, sq, dtype=torch.bool)
    if which == "q":
        if vis[pos].any():  # a row that sees no key outputs 0 whatever its q holds
            out[0, pos, head] = True
            lse[0, head, pos] = True
        return out, lse
    group = heads // kv_heads
    rows = vis[:, pos]
    for h in range(head * group, (head + 1) * group):
        if which == "k":
            out[0, rows, h] = True
            lse[0, h, rows] = True
        else:
            out[0, rows, h, col] = True
    return out, lse


def _check_nan_rule(backend, sq, sk, heads, kv_heads, causal, window, which, pos, head=0, col=3):
    q, k, v = _qkv(backend, b=2, sq=sq, sk=sk, heads=heads, kv_heads=kv_heads)
    {"q": q, "k": k, "v": v}[which][0, pos, head, col] = NAN
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True,
                                  backend=backend)
    eff = (window[0], 0) if causal else window
    e_out, e_lse = _expected_nan(q.shape, sk, kv_heads, eff, which, pos, head, col)
    got_out, got_lse = torch.isnan(out).cpu(), torch.isnan(lse).cpu()
    assert torch.equal(got_out, e_out), (f"NaN outputs at {got_out.nonzero().tolist()[:12]}, expected at "
                                         f"{e_out.nonzero().tolist()[:12]}")
    assert torch.equal(got_lse, e_lse), (got_lse.nonzero().tolist(), e_lse.nonzero().tolist())
    assert not torch.isinf(out).any()


# (sq, sk, heads, kv_heads, causal, window, which, pos): a NaN at a key some rows see and some do
# not; a NaN q row; a row-by-row decoding shape (the CPU kernel's direct path) and a tiled one.
NAN_CASES = {
    "k, causal 8x8": (8, 8, 2, 2, True, (-1, -1), "k", 5),
    "q, causal 8x8": (8, 8, 2, 2, True, (-1, -1), "q", 2),
    "k at key 0, causal": (8, 8, 2, 2, True, (-1, -1), "k", 0),
    "v, causal 8x8": (8, 8, 2, 2, True, (-1, -1), "v", 5),
    "k, decoding 3x10": (3, 10, 2, 1, True, (-1, -1), "k", 9),
    "v, decoding 3x10": (3, 10, 2, 1, True, (-1, -1), "v", 9),
    "q, window, row sees nothing": (12, 6, 2, 2, True, (2, -1), "q", 1),
    "v, window 70x70": (70, 70, 2, 2, False, (8, 4), "v", 40),
    "k, window 70x70": (70, 70, 2, 1, False, (8, 4), "k", 40),
}
# The NaN-in-v cases hold the kernels to the rule where it is hardest: the CUDA kernel
# (flash_fwd_kernel.cuh) and the Triton forward compute O += P V over whole key tiles, and a key
# masked for a row has P = 0 there but 0 * NaN = NaN; their masked tiles count V's inf / NaN as
# 0 and add what they contribute to the rows that see them separately.
_SLOW = {"v, window 70x70", "k, window 70x70"}


def _nan_params():
    params = []
    for backend in ALL:
        name = backend if isinstance(backend, str) else backend.values[0]
        marks = () if isinstance(backend, str) else tuple(backend.marks)
        for case, args in NAN_CASES.items():
            if name == "triton" and case in _SLOW and DEVICE == "cpu":
                continue  # the interpreter: the small cases cover the same code
            params.append(pytest.param(name, *args, id=f"{name}-{case}", marks=marks))
    return params


@pytest.mark.parametrize("backend,sq,sk,heads,kv_heads,causal,window,which,pos", _nan_params())
def test_nan_rule(backend, sq, sk, heads, kv_heads, causal, window, which, pos):
    _check_nan_rule(backend, sq, sk, heads, kv_heads, causal, window, which, pos)


@pytest.mark.parametrize("backend", ALL)
def test_nan_in_unused_cache_slots_and_other_sequences_never_matters(backend):
    """The slots of a KV cache past a row's cache_seqlens (torch.empty memory, say) and the keys
    of another packed sequence are invisible: NaN there changes nothing."""
    dt = _attn_dtype(backend)
    q = torch.randn(2, 1, 2, 64, device=DEVICE).to(dt)
    kc, vc = (torch.randn(2, 16, 2, 64, device=DEVICE).to(dt) for _ in range(2))
    lens = torch.tensor([5, 11], dtype=torch.int32, device=DEVICE)
    clean = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), cache_seqlens=lens, causal=True, backend=backend)
    kc[0, 5:], vc[0, 5:], kc[1, 11:], vc[1, 11:] = NAN, NAN, NAN, NAN
    with torch.no_grad():
        out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, backend=backend)
    assert torch.equal(out, clean)
    # Packed: NaN keys and values in sequence 1 never reach sequence 0.
    qp, kp, vp = (t[0] for t in _qkv(backend, sq=9, sk=9))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    kp[4:], vp[4:] = NAN, NAN
    out = flash_attn_varlen_func(qp, kp, vp, cu, cu, 5, 5, causal=True, backend=backend)
    assert torch.isfinite(out[:4]).all() and torch.isnan(out[4:]).all()


def _hyp_nan(backend, max_examples, tensors):
    @settings(max_examples=max_examples, **_HYP)
    @given(sq=st.integers(1, 80), sk=st.integers(1, 80), causal=st.booleans(),
           window=st.sampled_from([(-1, -1), (3, 0), (0, 2), (5, 5), (70, 0)]), which=st.sampled_from(tensors),
           data=st.data())
    def check(sq, sk, causal, window, which, data):
        pos = data.draw(st.integers(0, (sq if which == "q" else sk) - 1))
        _check_nan_rule(backend, sq, sk, 2, 1, causal, window, which, pos)

    check()


@pytest.mark.parametrize("backend", ALL)
def test_nan_rule_hypothesis(backend):
    """Random shapes, masks and NaN positions (the CPU kernel's direct and tiled paths, several
    key tiles): exactly the outputs the rule names are NaN."""
    name = backend if isinstance(backend, str) else backend.values[0]
    _hyp_nan(backend, 80 if name in ("cpu", "ref") else 12 if name == "triton" else 24, "qkv")


def _poison(v: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """v with n random elements set to +inf, -inf and NaN in turn (two of them in one column of
    adjacent keys, +inf and -inf, so that some row may see both)."""
    g = torch.Generator().manual_seed(seed)
    v = v.clone()
    flat = v.view(-1, v.shape[-1])  # (keys * kv_heads, d)
    rows = torch.randint(0, flat.shape[0], (n,), generator=g).tolist()
    cols = torch.randint(0, flat.shape[1], (n,), generator=g).tolist()
    for i, (r, c) in enumerate(zip(rows, cols)):
        flat[r, c] = (INF, -INF, NAN)[i % 3]
    heads = v.shape[-2]
    r = rows[0] + heads if rows[0] + heads < flat.shape[0] else rows[0] - heads  # same head, next key
    flat[rows[0], cols[0]], flat[r, cols[0]] = INF, -INF
    return v


def _assert_same_nonfinite(out, ref, atol):
    """Same NaN, +inf and -inf elements as the reference; the finite ones close."""
    out, ref = out.float().cpu(), ref.float().cpu()
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, want = f(out), f(ref)
        assert torch.equal(got, want), (f"{name} at {(got & ~want).nonzero().tolist()[:8]} not in the reference, "
                                        f"missing at {(want & ~got).nonzero().tolist()[:8]}")
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=atol, rtol=0)


# (sq, sk, heads, kv_heads, d, causal, window, dropout_p): key tiles the rows partly see on the
# causal diagonal, at both window edges (GQA), when decoding a few rows, under dropout (a dropped
# visible key with an infinite v gives NaN, p = 0), with head_dim 128 (the CUDA kernel's 64-key tiles).
NONFINITE_V_CASES = {
    "causal 70x70": (70, 70, 2, 2, 64, True, (-1, -1), 0.0),
    "window 70x150 gqa": (70, 150, 2, 1, 64, False, (20, 10), 0.0),
    "decoding 3x10": (3, 10, 2, 1, 64, True, (-1, -1), 0.0),
    "causal 70x70 dropout": (70, 70, 2, 2, 64, True, (-1, -1), 0.3),
    "window 40x200 d128": (40, 200, 2, 2, 128, True, (30, -1), 0.0),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("case", list(NONFINITE_V_CASES))
@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_v_matches_reference(backend, case):
    """inf, -inf and NaN in v, at keys some rows see and some do not: every backend's output has
    the reference's NaN / +inf / -inf elements (a visible inf gives inf of its sign, both signs or
    p = 0 give NaN, an invisible one nothing) and the reference's finite values elsewhere."""
    sq, sk, heads, kv_heads, d, causal, window, dropout_p = NONFINITE_V_CASES[case]
    torch.manual_seed(0)
    q, k, v = _qkv(backend, b=2, sq=sq, sk=sk, heads=heads, kv_heads=kv_heads, d=d)
    v = _poison(v, 24, seed=sq * sk + d)
    torch.manual_seed(7)
    out = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal, window_size=window, backend=backend)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # what the API draws
    eff = (window[0], 0) if causal else window
    ref, _ = flash_attn_ref(q, k, v, softmax_scale=d**-0.5, window_size=eff, dropout_p=dropout_p, seed=seed)
    _assert_same_nonfinite(out, ref, atol=2e-2 if q.dtype == torch.float16 else 1e-4)
    assert torch.isinf(ref).any() and torch.isnan(ref).any(), "the case exercises both"
    vis = _visible(sq, sk, *eff)
    poisoned = (~torch.isfinite(v)).any(-1).any(-1).any(0).cpu()  # (sk,) keys with a non-finite v
    assert (poisoned & vis.any(0) & ~vis.all(0)).any(), "a poisoned key that some rows see and some do not"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_v_varlen_and_kvcache(backend):
    """The packed (varlen) and KV-cache entry points run the same kernels: a non-finite v masked
    by causal for some rows of a sequence, or past a cache row's length, follows the rule."""
    dt = _attn_dtype(backend)
    torch.manual_seed(1)
    qp, kp, vp = (t[0] for t in _qkv(backend, sq=75, sk=75))
    vp = _poison(vp, 18, seed=3)
    cu = torch.tensor([0, 5, 75], dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(qp, kp, vp, cu, cu, 70, 70, causal=True, backend=backend)
    ref, _ = flash_attn_ref(qp, kp, vp, softmax_scale=64**-0.5, window_size=(-1, 0), cu_seqlens_q=cu, cu_seqlens_k=cu)
    _assert_same_nonfinite(out, ref, atol=2e-2 if dt == torch.float16 else 1e-4)
    # Four new rows against caches filled to 20 and 37 keys: causal hides each row's later keys.
    q = torch.randn(2, 4, 2, 64, device=DEVICE).to(dt)
    kc, vc = (torch.randn(2, 48, 2, 64, device=DEVICE).to(dt) for _ in range(2))
    vc = _poison(vc, 30, seed=4)
    lens = torch.tensor([20, 37], dtype=torch.int32, device=DEVICE)
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, backend=backend)
    ref = torch.cat([flash_attn_ref(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], softmax_scale=64**-0.5,
                                    window_size=(-1, 0))[0] for b, n in enumerate(lens.tolist())])
    _assert_same_nonfinite(out, ref, atol=2e-2 if dt == torch.float16 else 1e-4)


# Backward with non-finite inputs is unspecified (README); what holds is tested. The forward rule
# does not carry over: dP = dO V^T is formed for every (row, key) pair a kernel visits, so a NaN
# in v, even at a key a row cannot see, reaches that row's dS (0 * NaN) and so its dq, and dk of
# the keys it meets; dv stays finite. On shapes of one tile every backend gives the reference
# autograd's pattern (on longer ones the kernels skip tiles no row of which sees the key, the
# dense reference does not). For inf in v, and NaN or inf in q or k, the kernels' dk / dv
# patterns differ from the reference autograd's.
NAN_V_BACKWARD_CASES = {
    "causal 8x8, masked for rows 0-4": (8, 8, True, (-1, -1), 5),
    "window 70x70": (70, 70, False, (8, 4), 40),
    "no mask 8x8": (8, 8, False, (-1, -1), 5),
}


@pytest.mark.parametrize("case", list(NAN_V_BACKWARD_CASES))
@pytest.mark.parametrize("backend", ALL)
def test_nan_v_backward_pattern_matches_reference(backend, case):
    """A NaN in v (at a key some rows cannot see): out, dq, dk, dv NaN exactly where the
    reference autograd's are; dv finite, dq NaN in every row of the head."""
    sq, sk, causal, window, pos = NAN_V_BACKWARD_CASES[case]
    torch.manual_seed(0)
    q, k, v = _qkv(backend, b=1, sq=sq, sk=sk, heads=2, kv_heads=2)
    v[0, pos, 0, 3] = NAN
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype).to(DEVICE)
    out = flash_attn_func(q, k, v, causal=causal, window_size=window, backend=backend)
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))
    eff = (window[0], 0) if causal else window
    ref_out, _ = flash_attn_ref(q, k, v, softmax_scale=64**-0.5, window_size=eff)
    want = (ref_out, *torch.autograd.grad(ref_out, (q, k, v), dout))
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(torch.isnan(g).cpu(), torch.isnan(w).cpu()), (what, int(torch.isnan(g).sum()),
                                                                          int(torch.isnan(w).sum()))
    assert torch.isfinite(got[3]).all() and torch.isnan(got[1][0, :, 0]).all()
