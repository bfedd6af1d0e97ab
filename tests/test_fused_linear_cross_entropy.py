"""fused_linear_cross_entropy against its reference (F.linear + F.cross_entropy): value and every
gradient over odd shapes, chunkings, dtypes, ignore_index and reductions; labels refused
exactly where F.cross_entropy refuses them; bad arguments named."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from phi_kernels import fused_linear_cross_entropy
from phi_kernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy_ref


def _inputs(n, c, v, dtype, bias=True, ignore_index=-100, ignored_every=5):
    h = torch.randn(n, c, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, c, dtype=dtype) / c**0.5).requires_grad_()
    b = torch.randn(v, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    t[::ignored_every] = ignore_index
    return h, w, b, t


def _grads(loss, tensors):
    return torch.autograd.grad(loss * 2.5, [x for x in tensors if x is not None])  # a non-unit incoming gradient


@pytest.mark.parametrize("n,c,v,chunk", [(1, 8, 5, 1024), (7, 16, 33, 3), (130, 24, 257, 64), (64, 40, 100, 64)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference_fp64(n, c, v, chunk, bias, reduction):
    h, w, b, t = _inputs(n, c, v, torch.float64, bias)
    got = fused_linear_cross_entropy(h, w, b, t, chunk_rows=chunk, reduction=reduction)
    expect = fused_linear_cross_entropy_ref(h, w, b, t, reduction=reduction)
    torch.testing.assert_close(got, expect.float(), rtol=1e-6, atol=1e-6)
    for a, e in zip(_grads(got, (h, w, b)), _grads(expect, (h, w, b))):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)  # both take fp32 logits


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_no_rows_gives_zero_loss_and_zero_gradients(bias):
    """Zero rows (no chunk runs): loss 0 and zero gradients of the right shapes and dtypes."""
    h, w, b, t = _inputs(0, 8, 5, torch.float32, bias)
    loss = fused_linear_cross_entropy(h, w, b, t)
    grads = _grads(loss, (h, w, b))
    assert float(loss.detach()) == 0.0
    for g, x in zip(grads, [x for x in (h, w, b) if x is not None]):
        assert g.shape == x.shape and g.dtype == x.dtype and not g.any()


def test_matches_reference_and_plain_cross_entropy_fp32():
    """fp32 against the reference, and the reference against F.cross_entropy's own mean."""
    h, w, b, t = _inputs(300, 64, 1000, torch.float32)
    got = fused_linear_cross_entropy(h, w, b, t, chunk_rows=128)
    expect = fused_linear_cross_entropy_ref(h, w, b, t)
    torch.testing.assert_close(expect, F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100))
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    for a, e in zip(_grads(got, (h, w, b)), _grads(expect, (h, w, b))):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_bf16_error_no_larger_than_plain_pytorch_in_bf16():
    """In bf16 the fused op (fp32 logits per chunk, fp32 d weight accumulation) is no further from
    the fp64 truth than the unfused reference run on the same bf16 tensors (with slack 2x)."""
    h, w, b, t = _inputs(96, 64, 200, torch.bfloat16)
    truth = [x.detach().double().requires_grad_() for x in (h, w, b)]
    exact = fused_linear_cross_entropy_ref(*truth, t)
    g_exact = _grads(exact, truth)
    got = fused_linear_cross_entropy(h, w, b, t, chunk_rows=32)
    plain = fused_linear_cross_entropy_ref(h, w, b, t)
    assert abs(got.double() - exact) <= 2 * abs(plain.double() - exact) + 1e-6
    for g, p, e in zip(_grads(got, (h, w, b)), _grads(plain, (h, w, b)), g_exact):
        assert (g.double() - e).abs().max() <= 2 * (p.double() - e).abs().max() + 1e-3


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_ignore_index_any_int_including_a_real_class(ignore_index):
    h, w, b, t = _inputs(40, 16, 10, torch.float64, ignore_index=ignore_index, ignored_every=3)
    got = fused_linear_cross_entropy(h, w, b, t, chunk_rows=16, ignore_index=ignore_index)
    expect = F.cross_entropy(F.linear(h, w, b), t, ignore_index=ignore_index)
    torch.testing.assert_close(got, expect.float(), rtol=1e-6, atol=1e-6)
    for a, e in zip(_grads(got, (h, w, b)), _grads(expect, (h, w, b))):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_every_label_ignored_gives_zero_loss_and_zero_grads():
    h, w, b, _ = _inputs(6, 8, 11, torch.float32)
    t = torch.full((6,), -100)
    for reduction in ("mean", "sum"):
        loss = fused_linear_cross_entropy(h, w, b, t, reduction=reduction)
        assert loss.item() == 0.0
        assert all(bool((g == 0).all()) for g in torch.autograd.grad(loss, (h, w, b)))


def test_no_grad_and_frozen_inputs():
    h, w, b, t = _inputs(50, 16, 30, torch.float64)
    expect = fused_linear_cross_entropy_ref(h, w, b, t)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, b, t), expect.detach().float())
    frozen_w = w.detach()  # only hidden trains (a frozen lm_head)
    got = fused_linear_cross_entropy(h, frozen_w, None, t)
    (gh,) = torch.autograd.grad(got, h)
    (gh_ref,) = torch.autograd.grad(fused_linear_cross_entropy_ref(h, frozen_w, None, t), h)
    torch.testing.assert_close(gh, gh_ref)


def test_phi_model_loss_is_the_same_op():
    from phi_model.loss import fused_linear_cross_entropy as from_phi_model

    assert from_phi_model is fused_linear_cross_entropy


# ----------------------------------------------------------------------------- bad input

VOCAB = 17


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1, -5, -101])
def test_out_of_range_labels_refused_like_cross_entropy(bad):
    h, w = torch.randn(6, 8), torch.randn(VOCAB, 8)
    t = torch.tensor([1, 2, -100, 3, 4, 5])
    t[3] = bad
    with pytest.raises((IndexError, RuntimeError)):
        F.cross_entropy(F.linear(h, w), t, ignore_index=-100)  # the peer refuses it too
    with pytest.raises(ValueError, match=rf"targets must be in \[0, {VOCAB}\) or -100 \(ignore_index\).*got {bad}"):
        fused_linear_cross_entropy(h, w, None, t)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-3, VOCAB + 2), min_size=1, max_size=12), st.sampled_from([-100, -1, 0, 5]))
def test_accepts_exactly_what_cross_entropy_accepts(labels, ignore_index):
    h, w = torch.randn(len(labels), 8, dtype=torch.float64), torch.randn(VOCAB, 8, dtype=torch.float64)
    t = torch.tensor(labels)
    try:
        expect = F.cross_entropy(F.linear(h, w), t, ignore_index=ignore_index)
    except (IndexError, RuntimeError):
        with pytest.raises(ValueError, match="targets must be in"):
            fused_linear_cross_entropy(h, w, None, t, ignore_index=ignore_index)
    else:
        got = fused_linear_cross_entropy(h, w, None, t, ignore_index=ignore_index)
        if bool((t != ignore_index).any()):  # all ignored: F.cross_entropy's NaN, our 0 (tested above)
            torch.testing.assert_close(got, expect.float(), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    h, w = torch.randn(6, 8), torch.randn(VOCAB, 8)
    t = torch.zeros(6, dtype=torch.long)
    cases = [
        (dict(targets=torch.zeros(6, dtype=torch.int32)), ValueError, "targets must be int64"),
        (dict(targets=torch.zeros(6)), ValueError, "targets must be int64"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, r"shape \(6,\)"),
        (dict(targets=[0] * 6), TypeError, "targets must be a tensor"),
        (dict(hidden=torch.randn(6, 7)), ValueError, r"hidden must be \(N, C\) and weight \(V, C\)"),
        (dict(hidden=torch.randn(6, 8, dtype=torch.float64)), ValueError, "share one floating dtype"),
        (dict(bias=torch.zeros(3)), ValueError, "bias must be None or a torch.float32 tensor"),
        (dict(bias=torch.zeros(VOCAB, dtype=torch.float64)), ValueError, "bias must be None"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be an int >= 1, got 0"),
        (dict(chunk_rows=True), ValueError, "chunk_rows"),
        (dict(ignore_index=1.5), ValueError, "ignore_index must be an int, got 1.5"),
        (dict(reduction="none"), ValueError, "reduction must be one of .* got 'none'"),
    ]
    for override, exc, match in cases:
        kw = dict(hidden=h, weight=w, bias=None, targets=t)
        kw.update(override)
        with pytest.raises(exc, match=match):
            fused_linear_cross_entropy(**kw)
