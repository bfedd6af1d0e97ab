"""linear (phi_kernels/linear.py, csrc/linear): the CPU GEMV kernel against fp64 math for every
dtype, odd shapes (K = 1, K not a multiple of any vector width, N = 1, odd N, 1 to 16 rows and
the F.linear fallback above), under every CPU capability this machine supports; the API's
fallbacks (autograd, torch.compile, many rows, GPU tensors); bad input."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from phi_kernels import BackendUnavailableError, backend_status, linear
from phi_kernels.linear import MAX_KERNEL_ROWS
from tests.conftest import subprocess_env
from tests.guard_pages import GUARDED_PREAMBLE

_linear_module = sys.modules["phi_kernels.linear"]
HAVE_CPU_KERNEL = backend_status("cpu", "cpu").available
needs_kernel = pytest.mark.skipif(not HAVE_CPU_KERNEL, reason="needs the C++ extension phi_kernels._C")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CAPABILITIES = ("baseline", "avx2", "avx512")


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 x W^T + b, and the fp64 sum of the terms' magnitudes (what rounding errors scale with)."""
    b64 = None if b is None else b.double()
    exact = F.linear(x.double(), w.double(), b64)
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b64.abs())
    return exact, scale


def _assert_rounding_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out is the fp32-accumulated result rounded once to the dtype: within one unit of the dtype
    of the exact value, plus the fp32 summation error bound ((k + 2) 2^-24 sum |terms|, doubled
    for the order the kernel sums in), plus the dtype's smallest subnormal step."""
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    exact, scale = _exact(x, w, b)
    info = torch.finfo(x.dtype)
    bound = info.eps * exact.abs() + 2 * (x.shape[-1] + 2) * 2.0**-24 * scale + info.tiny * info.eps
    err = (out.double() - exact).abs()
    worst = int(torch.argmax(err - bound)) if err.numel() else 0
    assert bool((err <= bound).all()), (f"error {err.flatten()[worst].item():.3e} > bound "
                                        f"{bound.flatten()[worst].item():.3e} at flat index {worst}")


def _make(rows: int | tuple, n: int, k: int, dtype: torch.dtype, bias: bool = True):
    lead = (rows,) if isinstance(rows, int) else rows
    x = torch.randn(*lead, k).to(dtype)
    w = (torch.randn(n, k) / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    return x, w, b


def _ran_kernel(fn) -> tuple[torch.Tensor, bool]:
    """fn()'s result and whether it called the C++ op (seen by the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.key == "phi_kernels::linear_out" for e in prof.key_averages())


# ----------------------------------------------------------------------------- kernel vs fp64

# (rows, N, K): K = 1 and K off every vector width (4, 8, 16), N = 1 and N off every panel size
# (8, 16, 24 rows), every row count from 1 to MAX_KERNEL_ROWS (tiles of 4, 2 and 1 row), and
# two products big enough for the OpenMP team (>= 1M multiply-adds).
SHAPES = ([(1, 1, 1), (1, 5, 1), (3, 1, 7), (2, 33, 37), (1, 8192 // 64, 256), (4, 49, 300), (5, 24, 16),
           (7, 17, 129), (1, 1, 1000)]
          + [(m, 37, 45) for m in range(1, MAX_KERNEL_ROWS + 1)]
          + [(1, 4100, 1030), (16, 300, 1000)])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_fp64(dtype):
    for rows, n, k in SHAPES:
        for bias in (True, False):
            x, w, b = _make(rows, n, k, dtype, bias)
            out, ran = _ran_kernel(lambda: linear(x, w, b, backend="cpu"))
            assert ran, (rows, n, k)
            _assert_rounding_close(out, x, w, b)


@pytest.fixture(params=CAPABILITIES)
def capability(request, monkeypatch):
    supported = list(torch.ops.phi_kernels.cpu_capabilities()) if HAVE_CPU_KERNEL else []
    if request.param not in supported:
        pytest.skip(f"this CPU lacks {request.param} (it supports {', '.join(supported) or 'nothing built'})")
    monkeypatch.setenv("PHI_KERNELS_CPU_CAPABILITY", request.param)
    assert torch.ops.phi_kernels.cpu_capability() == request.param
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_capability(capability, dtype):
    """Each ISA's build (baseline SSE2, AVX2, AVX-512) on shapes that reach all its code paths:
    every tile height, block and panel tails, the K tail, the OpenMP team."""
    for rows, n, k in [(1, 61, 77), (2, 25, 33), (3, 1, 1), (4, 49, 40), (7, 50, 17), (16, 31, 100), (1, 4100, 1030)]:
        x, w, b = _make(rows, n, k, dtype)
        _assert_rounding_close(linear(x, w, b, backend="cpu"), x, w, b)


GUARD_SCRIPT = GUARDED_PREAMBLE + textwrap.dedent(r"""
    import os
    import torch.nn.functional as F
    import phi_kernels

    op = torch.ops.phi_kernels.linear_out.default
    for cap in torch.ops.phi_kernels.cpu_capabilities():
        os.environ["PHI_KERNELS_CPU_CAPABILITY"] = cap
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rows, n, k in ((1, 1, 1), (3, 5, 7), (1, 9, 17), (4, 25, 33), (5, 13, 45), (16, 17, 129), (2, 40, 64)):
                x, w, b = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
                out = guarded(torch.zeros(rows, n, dtype=dtype))
                op(guarded(x), guarded(w), guarded(b), out)
                ref = F.linear(x.double(), w.double(), b.double())
                assert torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2), (cap, dtype, rows, n, k)
        print("checked", cap)
""")


@needs_kernel
@pytest.mark.skipif(sys.platform != "linux", reason="mmap / mprotect guard pages")
def test_no_access_past_the_tensors():
    """Every tensor of a call ends exactly at a PROT_NONE page, over shapes whose K, N and row
    tails end there, under every capability: a read or write one element too far is a
    segmentation fault of the subprocess (which fails this test)."""
    run = subprocess.run([sys.executable, "-c", GUARD_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=subprocess_env())
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.stdout.count("checked") == len(torch.ops.phi_kernels.cpu_capabilities())


# ----------------------------------------------------------------------------- layouts


@needs_kernel
def test_leading_dims_and_strided_x():
    w, b = torch.randn(40, 24), torch.randn(40)
    cases = {
        "3-D": torch.randn(2, 3, 24),
        "1-D": torch.randn(24),
        "column slice (row stride 50)": torch.randn(4, 50)[:, 3:27],
        "last dim strided": torch.randn(24, 3).t(),
        "permuted leading dims (not viewable)": torch.randn(3, 2, 24).transpose(0, 1),
        "expanded rows (stride 0)": torch.randn(1, 24).expand(5, 24),
    }
    for what, x in cases.items():
        x_before = x.clone()
        out, ran = _ran_kernel(lambda: linear(x, w, b, backend="cpu"))
        assert ran, what
        assert out.is_contiguous(), what
        _assert_rounding_close(out, x, w, b)
        assert torch.equal(x, x_before), f"{what}: x was modified"


@needs_kernel
def test_empty_dims():
    w, b = torch.randn(6, 0), torch.randn(6)
    torch.testing.assert_close(linear(torch.randn(3, 0), w, b, backend="cpu"), b.expand(3, 6))  # K = 0: the bias
    assert linear(torch.randn(0, 5), torch.randn(6, 5), backend="cpu").shape == (0, 6)
    assert linear(torch.randn(2, 0, 5), torch.randn(6, 5), backend="cpu").shape == (2, 0, 6)
    assert linear(torch.randn(3, 5), torch.randn(0, 5), backend="cpu").shape == (3, 0)


# ----------------------------------------------------------------------------- fallbacks


@needs_kernel
def test_many_rows_take_f_linear():
    x, w, b = _make((3, MAX_KERNEL_ROWS), 33, 40, torch.float32)  # 48 rows > the limit
    out, ran = _ran_kernel(lambda: linear(x, w, b, backend="cpu"))
    assert not ran
    assert torch.equal(out, F.linear(x, w, b))
    _, ran = _ran_kernel(lambda: linear(x[:, :5], w, b, backend="cpu"))  # 15 rows: the kernel
    assert ran


@pytest.mark.parametrize("backend", [None, "cpu", "ref"])
@pytest.mark.parametrize("needs_grad", ["x", "weight", "bias"])
def test_autograd_gets_f_linears_gradients(backend, needs_grad):
    if backend == "cpu" and not HAVE_CPU_KERNEL:
        pytest.skip("needs the C++ extension phi_kernels._C")
    x, w, b = _make((2, 1), 9, 13, torch.float32)
    ours_in = {"x": x.clone(), "weight": w.clone(), "bias": b.clone()}
    theirs_in = {"x": x.clone(), "weight": w.clone(), "bias": b.clone()}
    ours_in[needs_grad].requires_grad_()
    theirs_in[needs_grad].requires_grad_()
    out, ran = _ran_kernel(lambda: linear(ours_in["x"], ours_in["weight"], ours_in["bias"], backend=backend))
    ref = F.linear(theirs_in["x"], theirs_in["weight"], theirs_in["bias"])
    assert not ran and torch.equal(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(ours_in[needs_grad].grad, theirs_in[needs_grad].grad)
    if backend != "ref" and HAVE_CPU_KERNEL:
        with torch.no_grad():  # no graph recorded: the kernel, even though an input requires grad
            out, ran = _ran_kernel(lambda: linear(ours_in["x"], ours_in["weight"], ours_in["bias"], backend=backend))
        assert ran and not out.requires_grad


def test_autocast_gets_f_linear():
    """Under autocast x and weight may differ in dtype (autocast casts inside F.linear): the
    call is F.linear's, result dtype included, instead of a dtype error."""
    x, w0, w, b = torch.randn(2, 32), torch.randn(32, 32), torch.randn(8, 32), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.linear(x, w0)  # bf16 under autocast; w stays fp32
        got, want = linear(h, w, b), F.linear(h, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_torch_compile_traces_f_linear():
    x, w, b = _make((2, 1), 9, 13, torch.float32)
    compiled = torch.compile(lambda x: linear(x, w, b) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), F.linear(x, w, b) * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tensors_get_f_linear():
    x, w, b = (t.cuda() for t in _make(1, 64, 32, torch.float16))
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    with pytest.raises(BackendUnavailableError, match="runs on CPU tensors only"):
        linear(x, w, b, backend="cpu")


def test_default_backend_and_refusals(monkeypatch):
    monkeypatch.delenv("PHI_KERNELS_BACKEND", raising=False)
    x, w, b = _make(1, 5, 7, torch.float32)
    _, ran = _ran_kernel(lambda: linear(x, w, b))
    assert ran == HAVE_CPU_KERNEL  # "cpu" by default whenever it is built
    _, ran = _ran_kernel(lambda: linear(x, w, b, backend="ref"))
    assert not ran
    monkeypatch.setenv("PHI_KERNELS_BACKEND", "ref")  # the environment is read at every call
    _, ran = _ran_kernel(lambda: linear(x, w, b))
    assert not ran
    with pytest.raises(BackendUnavailableError, match="does not implement it"):
        linear(x, w, b, backend="triton")
    with pytest.raises(ValueError, match="'fast' is not a backend"):
        linear(x, w, b, backend="fast")


# ----------------------------------------------------------------------------- bad input


def _bad_calls():
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    return [
        ("x list", lambda: linear([1.0] * 8, w, b), "x must be a Tensor"),
        ("weight None", lambda: linear(x, None, b), "weight must be a Tensor"),
        ("x float64", lambda: linear(x.double(), w.double()),
         "x must be float32, float16 or bfloat16, got torch.float64"),
        ("weight dtype", lambda: linear(x, w.half(), b), "weight must have x's dtype torch.float32, got torch.float16"),
        ("bias dtype", lambda: linear(x, w, b.bfloat16()), "bias must have x's dtype"),
        ("weight device", lambda: linear(x, w.to("meta"), b), "weight must be on x's device cpu, got meta"),
        ("bias device", lambda: linear(x, w, b.to("meta")), "bias must be on x's device cpu, got meta"),
        ("weight 1-D", lambda: linear(x, w[0], b),
         r"weight must be 2-D \(out_features, in_features\), got shape \(8,\)"),
        ("x features", lambda: linear(x[:, :7], w, b), r"in_features = weight.shape\[1\] = 8, got shape \(2, 7\)"),
        ("x 0-D", lambda: linear(x[0, 0], w, b), r"got shape \(\)"),
        ("weight transposed", lambda: linear(x, torch.randn(8, 4).t(), b),
         r"weight must be contiguous .* strides \(1, 4\)"),
        ("bias shape", lambda: linear(x, w, b[:3]), r"bias must have shape \(out_features,\) = \(4,\), got \(3,\)"),
        ("bias list", lambda: linear(x, w, [0.0] * 4), "bias must be a Tensor or None"),
    ]


@pytest.mark.parametrize("name,call,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_bad_input_raises_value_error(monkeypatch, backend, name, call, match):
    monkeypatch.setenv("PHI_KERNELS_BACKEND", backend)
    with pytest.raises(ValueError, match=match):
        call()


@needs_kernel
def test_cpp_op_checks_before_writing():
    """The C++ op's own checks (for callers that skip the Python API) leave out untouched."""
    op = torch.ops.phi_kernels.linear_out.default
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    big = torch.full((24,), 7.0)  # x is its first 16 elements, out (contiguous) elements 12..19
    cases = [
        ("out shape", (x, w, b, torch.full((2, 5), 7.0)), r"out must have shape \[2, 4\]"),
        ("out dtype", (x, w, b, torch.full((2, 4), 7.0, dtype=torch.float16)), "must share a dtype"),
        ("out strided", (x, w, b, torch.full((4, 2), 7.0).t()), "out must be contiguous"),
        ("out overlaps x", (big[:16].view(2, 8), w, b, big[12:20].view(2, 4)), "out overlaps x or weight"),
        ("weight strided", (x, torch.randn(8, 4).t(), b, torch.full((2, 4), 7.0)), "weight must be a contiguous 2-D"),
        ("bias shape", (x, w, b[:3], torch.full((2, 4), 7.0)), r"bias must have shape"),
        ("x float64", (x.double(), w.double(), None, torch.full((2, 4), 7.0, dtype=torch.float64)),
         "x must be float32, float16 or bfloat16"),
    ]
    for what, args, match in cases:
        out = args[3]
        before = out.clone()
        with pytest.raises(RuntimeError, match=match):
            op(*args)
        assert torch.equal(out, before), f"{what}: out was written"


@needs_kernel
def test_cpp_op_any_row_count():
    """The API sends at most MAX_KERNEL_ROWS rows to the op, but the op is correct for any count."""
    x, w, b = _make((5, 8), 21, 19, torch.float32)  # 40 rows: ten tiles of 4
    out = torch.empty(5, 8, 21)
    torch.ops.phi_kernels.linear_out.default(x, w, b, out)
    _assert_rounding_close(out, x, w, b)


@needs_kernel
def test_opcheck_cpp_op():
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    torch.library.opcheck(torch.ops.phi_kernels.linear_out.default, (x, w, b, torch.empty(3, 5)),
                          test_utils=("test_schema", "test_autograd_registration"))
