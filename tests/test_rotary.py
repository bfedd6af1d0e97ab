"""apply_rotary: every backend against the reference, the reference against Hugging Face,
gradients, op registration, torch.compile, and bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi_kernels import BackendUnavailableError, apply_rotary, apply_rotary_qkv, rotary_cos_sin
from phi_kernels.reference import apply_rotary_ref
from phi_kernels.rotary import RotaryArgs
from tests.conftest import DEVICE, kernel_backend, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype):
    # Kernels and reference both compute in fp32 and round once; allow one rounding step
    # (fp32 may differ by FMA contraction).
    return {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def _make(batch, seqlen, heads, head_dim, rotary_dim, dtype, seqlen_ro=None, varlen_lengths=None):
    if varlen_lengths is not None:
        x = torch.randn(sum(varlen_lengths), heads, head_dim, device=DEVICE).to(dtype)
        cu = torch.tensor([0] + list(torch.tensor(varlen_lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    else:
        x = torch.randn(batch, seqlen, heads, head_dim, device=DEVICE).to(dtype)
        cu = None
    cos, sin = rotary_cos_sin(seqlen_ro or 2 * max(seqlen, 1) + 8, rotary_dim, device=DEVICE, dtype=dtype)
    return x, cos, sin, cu


def _assert_close(out, ref, dtype):
    torch.testing.assert_close(out.float(), ref.float(), atol=_tol(dtype), rtol=_tol(dtype))


# ----------------------------------------------------------------------------- kernels vs ref


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 32), (80, 32), (64, 64)])
def test_matches_reference(backend, dtype, interleaved, inplace, head_dim, rotary_dim):
    x, cos, sin, _ = _make(2, 19, 3, head_dim, rotary_dim, dtype)
    ref = apply_rotary_ref(x, cos, sin, interleaved=interleaved, seqlen_offsets=5)
    x_in = x.clone()
    out = apply_rotary(x_in, cos, sin, interleaved=interleaved, inplace=inplace, seqlen_offsets=5, backend=backend)
    _assert_close(out, ref, dtype)
    assert (out.data_ptr() == x_in.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(x_in, x), "out-of-place must not touch x"
    # Pass-through dims are bit-exact copies.
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_and_tensor_offsets(backend, dtype):
    lengths = [5, 1, 0, 17]
    x, cos, sin, cu = _make(None, 17, 2, 64, 32, dtype, varlen_lengths=lengths)
    offsets = torch.tensor([0, 3, 9, 2], dtype=torch.int32, device=DEVICE)
    ref = apply_rotary_ref(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu)
    out = apply_rotary(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=17, backend=backend)
    _assert_close(out, ref, dtype)
    # Padded layout with per-sequence offsets (KV-cache decoding: one new token per sequence).
    x1, cos1, sin1, _ = _make(4, 1, 2, 64, 32, dtype, seqlen_ro=40)
    off1 = torch.tensor([0, 7, 39, 12], dtype=torch.int32, device=DEVICE)
    _assert_close(apply_rotary(x1, cos1, sin1, seqlen_offsets=off1, backend=backend),
                  apply_rotary_ref(x1, cos1, sin1, seqlen_offsets=off1), dtype)


@pytest.mark.parametrize("backend", kernel_backends())
def test_strided_input(backend):
    """q sliced out of a fused projection: non-contiguous batch/seq/head strides."""
    big = torch.randn(2, 11, 3, 4, 64, device=DEVICE)
    q = big[:, :, 0]  # (2, 11, 4, 64), strides from the (3, 4, 64) row
    cos, sin = rotary_cos_sin(11, 32, device=DEVICE)
    torch.testing.assert_close(apply_rotary(q, cos, sin, backend=backend), apply_rotary_ref(q, cos, sin))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("inplace", [False, True])
def test_qkv(backend, inplace):
    qkv = torch.randn(2, 13, 3, 4, 80, device=DEVICE)
    cos, sin = rotary_cos_sin(13, 32, device=DEVICE)
    expect = qkv.clone()
    expect[:, :, 0] = apply_rotary_ref(qkv[:, :, 0], cos, sin)
    expect[:, :, 1] = apply_rotary_ref(qkv[:, :, 1], cos, sin)
    x = qkv.clone()
    out = apply_rotary_qkv(x, cos, sin, inplace=inplace, backend=backend)
    torch.testing.assert_close(out, expect)
    assert (out.data_ptr() == x.data_ptr()) == inplace


# ----------------------------------------------------------------------------- hypothesis


def _hypothesis_case(backend, data, max_examples):
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        batch=st.integers(1, 3),
        seqlen=st.integers(1, 40),
        heads=st.integers(1, 3),
        head_dim=st.sampled_from([8, 16, 64, 80]),
        rotary_frac=st.sampled_from([0.25, 0.5, 1.0]),
        interleaved=st.booleans(),
        inplace=st.booleans(),
        varlen=st.booleans(),
        tensor_offsets=st.booleans(),
        dtype=st.sampled_from(DTYPES),
        seed=st.integers(0, 2**16),
    )
    def check(batch, seqlen, heads, head_dim, rotary_frac, interleaved, inplace, varlen, tensor_offsets, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        rotary_dim = max(2, int(head_dim * rotary_frac) // 2 * 2)
        lengths = torch.randint(0, seqlen + 1, (batch,), generator=g).tolist() if varlen else None
        x, cos, sin, cu = _make(batch, seqlen, heads, head_dim, rotary_dim, dtype, varlen_lengths=lengths)
        if tensor_offsets:
            offsets = torch.randint(0, seqlen + 1, (batch,), generator=g).to(DEVICE, torch.int32)
        else:
            offsets = int(torch.randint(0, seqlen + 1, (1,), generator=g))
        kw = dict(interleaved=interleaved, seqlen_offsets=offsets, cu_seqlens=cu)
        ref = apply_rotary_ref(x, cos, sin, **kw)
        out = apply_rotary(x.clone(), cos, sin, inplace=inplace, max_seqlen=seqlen if varlen else None,
                           backend=backend, **kw)
        _assert_close(out, ref, dtype)

    check()


@pytest.mark.parametrize("backend", kernel_backends())
def test_hypothesis_shapes_and_options(backend):
    # The Triton interpreter is ~1000x slower than a compiled kernel: fewer examples there.
    _hypothesis_case(backend, None, max_examples=25 if backend == "triton" and DEVICE == "cpu" else 80)


# ----------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("head_dim", [64, 80])
def test_reference_matches_hugging_face(head_dim):
    """ref vs transformers' phi apply_rotary_pos_emb on the first 32 dims (partial rotary)."""
    modeling_phi = pytest.importorskip("transformers.models.phi.modeling_phi")
    rotary_dim, b, t, h = 32, 2, 23, 4
    q = torch.randn(b, t, h, head_dim, dtype=torch.float64)
    k = torch.randn(b, t, h, head_dim, dtype=torch.float64)
    cos, sin = rotary_cos_sin(t, rotary_dim, dtype=torch.float64)
    # HF layout: (B, H, T, D) and a (B, T, rotary_dim) cache holding cos(freqs) twice.
    cos_hf = torch.cat((cos, cos), -1).expand(b, t, rotary_dim)
    sin_hf = torch.cat((sin, sin), -1).expand(b, t, rotary_dim)
    q_rot, k_rot = modeling_phi.apply_rotary_pos_emb(
        q.transpose(1, 2)[..., :rotary_dim], k.transpose(1, 2)[..., :rotary_dim], cos_hf, sin_hf)
    torch.testing.assert_close(apply_rotary_ref(q, cos, sin)[..., :rotary_dim], q_rot.transpose(1, 2))
    torch.testing.assert_close(apply_rotary_ref(k, cos, sin)[..., :rotary_dim], k_rot.transpose(1, 2))


def test_cos_sin_match_hugging_face():
    """rotary_cos_sin vs transformers' PhiRotaryEmbedding (phi-1.5: rotary 32 of 64, theta 1e4).
    HF computes angles in fp32, we in fp64: they agree to fp32 angle error (~t * 6e-8)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    cfg = transformers.PhiConfig(hidden_size=256, num_attention_heads=4, partial_rotary_factor=0.5, rope_theta=10000.0)
    emb = PhiRotaryEmbedding(cfg)
    t = 256
    x = torch.zeros(1, t, 256)
    cos_hf, sin_hf = emb(x, torch.arange(t)[None])
    cos, sin = rotary_cos_sin(t, 32)
    torch.testing.assert_close(cos_hf[0, :, :16], cos, atol=5e-5, rtol=0)
    torch.testing.assert_close(sin_hf[0, :, :16], sin, atol=5e-5, rtol=0)
    torch.testing.assert_close(cos_hf[0, :, 16:], cos, atol=5e-5, rtol=0)


def test_reference_is_a_rotation():
    """Independent of any implementation: norms of each pair are preserved, and the conjugate
    undoes the rotation."""
    x = torch.randn(2, 9, 3, 64, dtype=torch.float64)
    cos, sin = rotary_cos_sin(9, 64, dtype=torch.float64)
    y = apply_rotary_ref(x, cos, sin)
    pair_norm = lambda z: z[..., :32] ** 2 + z[..., 32:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(apply_rotary_ref(y, cos, sin, conjugate=True), x)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is the identity


# ----------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_gradient_matches_fp64_autograd(backend, inplace, varlen):
    x, cos, sin, cu = _make(2, 11, 2, 80, 32, torch.float32, varlen_lengths=[4, 11] if varlen else None)
    kw = dict(seqlen_offsets=3, cu_seqlens=cu, interleaved=False)
    grad_out = torch.randn_like(x)
    x64 = x.double().requires_grad_()
    apply_rotary_ref(x64, cos.double(), sin.double(), **kw).backward(grad_out.double())
    xk = x.clone().requires_grad_()
    inp = xk.clone() if inplace else xk  # in-place on a leaf is not allowed: rotate a copy
    out = apply_rotary(inp, cos, sin, inplace=inplace, max_seqlen=11 if varlen else None, backend=backend, **kw)
    out.backward(grad_out)
    torch.testing.assert_close(xk.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    x, cos, sin, _ = _make(2, 7, 2, 64, 32, torch.float32)
    args = (x, cos, sin, None, 2, None, 7, False, False, backend)
    torch.library.opcheck(torch.ops.phi_kernels.rotary.default, args)
    torch.library.opcheck(torch.ops.phi_kernels.rotary_.default, (x.clone(),) + args[1:])
    x.requires_grad_()
    torch.library.opcheck(torch.ops.phi_kernels.rotary.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.values[0] != "triton"])
def test_opcheck_cpp_kernel_op(backend):
    x, cos, sin, _ = _make(2, 7, 2, 64, 32, torch.float32)
    # cuda-emu's op is the emulated twin of phi_kernels::rotary_out, with the same schema.
    ops = torch.ops.phi_kernels_emu if backend == "cuda-emu" else torch.ops.phi_kernels
    torch.library.opcheck(ops.rotary_out.default,
                          (x, cos, sin, *RotaryArgs(seqlen_offset=2, max_seqlen=7).positional(), torch.empty_like(x)),
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.values[0] != "triton"] + ["ref"])
def test_torch_compile_fullgraph(backend):
    x, cos, sin, _ = _make(2, 9, 2, 64, 32, torch.float32)

    def f(x):
        return apply_rotary(x, cos, sin, seqlen_offsets=1, backend=backend).square().sum()

    xc = x.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(xc)
    loss.backward()
    xe = x.clone().requires_grad_()
    f(xe).backward()
    torch.testing.assert_close(loss, f(x))
    torch.testing.assert_close(xc.grad, xe.grad)


def test_torch_compile_inductor_cpu_backend():
    """The full default compiler (Inductor) around the C++ op, on the CPU backend."""
    status = kernel_backend("cpu", "cpu")
    if status.marks:
        pytest.skip("cpu backend unavailable")
    x, cos, sin, _ = _make(1, 5, 2, 64, 32, torch.float32)
    f = lambda x: apply_rotary(x * 2, cos, sin, backend="cpu") + 1  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


# ----------------------------------------------------------------------------- backend choice


def test_backend_choice_errors(monkeypatch):
    x, cos, sin, _ = _make(1, 3, 1, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="not a backend"):
        apply_rotary(x, cos, sin, backend="fast")
    if DEVICE == "cpu":
        with pytest.raises(BackendUnavailableError, match="cuda.*CUDA tensors"):
            apply_rotary(x, cos, sin, backend="cuda")
        monkeypatch.setenv("PHI_KERNELS_BACKEND", "cuda")
        with pytest.raises(BackendUnavailableError, match="PHI_KERNELS_BACKEND"):
            apply_rotary(x, cos, sin)
    monkeypatch.setenv("PHI_KERNELS_BACKEND", "ref")
    torch.testing.assert_close(apply_rotary(x, cos, sin), apply_rotary_ref(x, cos, sin))


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    x = torch.randn(2, 8, 2, 64)
    cos, sin = rotary_cos_sin(16, 32)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    packed = torch.randn(8, 2, 64)
    return [
        ("odd rotary_dim", lambda: rotary_cos_sin(8, 31), "rotary_dim must be a positive even"),
        ("rotary_dim > head_dim", lambda: apply_rotary(torch.randn(1, 4, 2, 16), cos, sin), "rotary_dim"),
        ("cos 1-D", lambda: apply_rotary(x, cos[:, 0], sin), "cos must be a 2-D"),
        ("sin shape", lambda: apply_rotary(x, cos, sin[:, :8]), "sin must have cos's shape"),
        ("cache too short", lambda: apply_rotary(x, cos[:8], sin[:8], seqlen_offsets=1), "cos/sin have 8 rows"),
        ("offsets too long", lambda: apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([0, 9])), "needs 17"),
        ("dtype mismatch", lambda: apply_rotary(x.half(), cos, sin), "cos must have x's dtype"),
        ("int x", lambda: apply_rotary(x.long(), cos, sin), "x must be float32"),
        ("3-D without cu_seqlens", lambda: apply_rotary(packed, cos, sin), r"x must be \(batch, seqlen"),
        ("cu_seqlens int64", lambda: apply_rotary(packed, cos, sin, cu_seqlens=cu.long(), max_seqlen=5),
         "cu_seqlens must be a 1-D int32"),
        ("cu_seqlens decreasing", lambda: apply_rotary(packed, cos, sin, cu_seqlens=torch.tensor([0, 5, 3], dtype=torch.int32),
                                                       max_seqlen=5), "non-decreasing"),
        ("max_seqlen missing", lambda: apply_rotary(packed, cos, sin, cu_seqlens=cu), "max_seqlen must be"),
        ("max_seqlen too small", lambda: apply_rotary(packed, cos, sin, cu_seqlens=cu, max_seqlen=3), "max_seqlen=3"),
        ("negative offset", lambda: apply_rotary(x, cos, sin, seqlen_offsets=-1), "seqlen_offsets must be"),
        ("negative tensor offset", lambda: apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([0, -1])),
         "seqlen_offsets must be non-negative"),
        ("offsets shape", lambda: apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([1, 2, 3])), r"shape \(batch,\)"),
        ("head_dim strided", lambda: apply_rotary(x[..., ::2], cos[:, :8], sin[:, :8]), "contiguous in its last dim"),
        ("qkv shape", lambda: apply_rotary_qkv(x, cos, sin), "qkv must be"),
    ]


@pytest.mark.parametrize("name,call,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_value_error(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- the CUDA build


def test_cuda_rotary_kernels_compiled_without_spills():
    from phi_kernels import inspect as pk_inspect

    if not pk_inspect.extension_has_cuda():
        pytest.skip("phi_kernels._C was built without CUDA kernels")
    kernels = [k for k in pk_inspect.cuda_kernels() if "rotary_kernel" in k.name]
    archs = {k.arch for k in kernels}
    assert {"sm_80", "sm_90a"} <= archs, f"rotary kernels found for {archs}"
    assert len(kernels) >= 6, "one kernel per dtype (fp32, fp16, bf16) per arch"
    for k in kernels:
        assert k.spill_bytes == 0 and k.stack == 0, k
        assert 0 < k.registers <= 255, k
