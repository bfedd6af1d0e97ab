"""FusedAdam under bad input (issue 18): every bad input raises an error naming the argument,
before anything is written, on every backend; a bad grad_scale skips the step.

"Nothing changed" means byte-identical: every param, every state tensor and step count compared
with torch.equal against clones taken before the failing call, no state created for a param
that had none, and the param groups as they were.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from phi_kernels import BackendUnavailableError, FusedAdam
from tests.conftest import DEVICE, kernel_backend, kernel_backends

BACKENDS = kernel_backends() + ["ref"]
CAPTURABLE_BACKENDS = [p for p in kernel_backends() if p.values[0] != "cpu"] + ["ref"]


def _and_capturable():
    """(backend, capturable) params: every backend plain, and capturable where it runs."""
    out = []
    for capturable, backends in ((False, BACKENDS), (True, CAPTURABLE_BACKENDS)):
        for b in backends:
            name, marks = (b, ()) if isinstance(b, str) else (b.values[0], b.marks)
            out.append(pytest.param(name, capturable, marks=marks, id=name + ("-capturable" if capturable else "")))
    return out


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)


def _setup(backend, capturable=False):
    """Two groups (fp32 + a bf16 param with a master copy in group 0, amsgrad in group 1), one
    step taken; then fresh grads, and a param `fresh` in group 0 that has no state yet."""
    torch.manual_seed(0)
    a = torch.randn(5, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    h = torch.randn(6, device=DEVICE).to(torch.bfloat16).requires_grad_()
    fresh = torch.randn(4, device=DEVICE, requires_grad=True)
    c = torch.randn(7, device=DEVICE, requires_grad=True)
    d = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    opt = FusedAdam([{"params": [a, b, h, fresh]}, {"params": [c, d], "amsgrad": True, "lr": 2e-3}],
                    lr=1e-3, weight_decay=0.1, master_weights=True, capturable=capturable, backend=backend)
    _grads([a, b, h, c, d])
    opt.step()
    assert fresh not in opt.state
    _grads([a, b, h, fresh, c, d], seed=2)
    return opt, dict(a=a, b=b, h=h, fresh=fresh, c=c, d=d)


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [(p, p.detach().clone()) for p in params],
        "state": {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                  for p, s in opt.state.items()},
        "groups": [(len(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
    }


def _assert_unchanged(opt, snap, fresh_state_ok=False):
    """fresh_state_ok: a capturable step decides to skip on the device, after the host created
    the state of a param that had none; that state must then be the initial one (zeros, step 0),
    as torch.optim.AdamW's would be."""
    for p, before in snap["params"]:
        assert p.dtype == before.dtype and torch.equal(p.detach(), before), "a param changed"
    new = set(opt.state) - set(snap["state"])
    if fresh_state_ok:
        for p in new:
            s = opt.state[p]
            assert float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
        new = set()
    assert not new and set(opt.state) >= set(snap["state"]), "state was created or dropped"
    for p, s in snap["state"].items():
        assert set(opt.state[p]) == set(s), "state keys changed"
        for k, v in s.items():
            now = opt.state[p][k]
            assert type(now) is type(v), k
            if isinstance(v, torch.Tensor):
                assert now.dtype == v.dtype and now.device == v.device and torch.equal(now, v), k
            else:
                assert now == v, k
    assert len(opt.param_groups) == len(snap["groups"])


def _last_group(opt):
    return opt.param_groups[-1]


def _set_data(t, value):
    t.data = value


# name -> (how to make the last group (or the call) bad, what the message must contain)
LAST_GROUP_BAD = {
    "sparse_grad": (lambda o, p: setattr(p["d"], "grad", torch.zeros(2, 3, device=DEVICE).to_sparse()),
                    r"sparse gradients \(param_groups\[1\]\['params'\]\[1\]\.grad"),
    "grad_shape": (lambda o, p: _set_data(p["d"].grad, torch.zeros(7, device=DEVICE)),
                   r"grad must match its param: param_groups\[1\]\['params'\]\[1\]"),
    "grad_dtype": (lambda o, p: _set_data(p["d"].grad, p["d"].grad.double()),
                   r"grad must match its param: param_groups\[1\]\['params'\]\[1\]"),
    "param_dtype": (lambda o, p: _set_data(p["d"], p["d"].detach().double()),
                    r"float32, float16 and bfloat16 params, got torch.float64 for param_groups\[1\]\['params'\]\[1\]"),
    "param_not_contiguous": (lambda o, p: _set_data(p["d"], p["d"].detach().t()),
                             r"contiguous params: param_groups\[1\]\['params'\]\[1\]"),
    "lr_negative": (lambda o, p: _last_group(o).update(lr=-0.1),
                    r"param_groups\[1\]\['lr'\] must be a finite number >= 0, got -0.1"),
    "lr_nan": (lambda o, p: _last_group(o).update(lr=math.nan), r"param_groups\[1\]\['lr'\] must be a finite"),
    "lr_inf": (lambda o, p: _last_group(o).update(lr=math.inf), r"param_groups\[1\]\['lr'\] must be a finite"),
    "lr_tensor_negative": (lambda o, p: _last_group(o).update(lr=torch.tensor(-1e-3)),
                           r"param_groups\[1\]\['lr'\] must be a finite number >= 0"),
    "lr_tensor_two_elements": (lambda o, p: _last_group(o).update(lr=torch.tensor([1e-3, 1e-3])),
                               r"param_groups\[1\]\['lr'\] must be a one-element tensor"),
    "lr_string": (lambda o, p: _last_group(o).update(lr="1e-3"), r"param_groups\[1\]\['lr'\] must be a number"),
    "beta1_one": (lambda o, p: _last_group(o).update(betas=(1.0, 0.999)),
                  r"param_groups\[1\]\['betas'\]\[0\] must be a number in \[0, 1\)"),
    "beta2_negative": (lambda o, p: _last_group(o).update(betas=(0.9, -0.5)),
                       r"param_groups\[1\]\['betas'\]\[1\] must be a number in \[0, 1\)"),
    "betas_not_a_pair": (lambda o, p: _last_group(o).update(betas=(0.9,)),
                         r"param_groups\[1\]\['betas'\] must be a pair"),
    "eps_negative": (lambda o, p: _last_group(o).update(eps=-1e-8), r"param_groups\[1\]\['eps'\] must be a finite"),
    "weight_decay_nan": (lambda o, p: _last_group(o).update(weight_decay=math.nan),
                         r"param_groups\[1\]\['weight_decay'\] must be a finite"),
    "flag_not_bool": (lambda o, p: _last_group(o).update(amsgrad="no"),
                      r"param_groups\[1\]\['amsgrad'\] must be a bool"),
    "duplicate_across_groups": (lambda o, p: _last_group(o)["params"].append(p["a"]),
                                r"more than one parameter group: "
                                r"param_groups\[1\]\['params'\]\[2\] is param_groups\[0\]"),
    "duplicate_in_group": (lambda o, p: _last_group(o)["params"].append(p["c"]),
                           r"appears twice in one parameter group: param_groups\[1\]\['params'\]\[2\]"),
    "state_shape": (lambda o, p: o.state[p["d"]].update(exp_avg=torch.zeros(6, device=DEVICE)),
                    r"state of param_groups\[1\]\['params'\]\[1\]: exp_avg must be a floating-point tensor of the "
                    r"param's shape \(2, 3\), got torch.float32\(6,\)"),
    "state_missing_moment": (lambda o, p: o.state[p["d"]].pop("exp_avg_sq"),
                             r"state of param_groups\[1\]\['params'\]\[1\] has exp_avg but no exp_avg_sq"),
}


@pytest.mark.parametrize("case", list(LAST_GROUP_BAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_last_group_changes_nothing(backend, case):
    """The bad input is in the last group: group 0 used to be updated (and step counts advanced,
    state created) before the error."""
    opt, p = _setup(backend)
    make_bad, match = LAST_GROUP_BAD[case]
    make_bad(opt, p)
    snap = _snapshot(opt)  # the caller's (bad) input, as the failing step must leave it
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", CAPTURABLE_BACKENDS)
def test_bad_last_group_changes_nothing_capturable(backend):
    """Capturable: step counts on the device; a bad later group still stops everything."""
    opt, p = _setup(backend, capturable=True)
    snap = _snapshot(opt)
    _last_group(opt)["lr"] = torch.tensor([-1.0])  # a CPU tensor: value-checked even when capturable
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] must be a finite number >= 0"):
        opt.step()
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", [kernel_backend("cpu")])
def test_unavailable_backend_for_a_later_group_changes_nothing(backend):
    """Backend availability is resolved for every bucket before the first kernel: here the cpu
    kernel cannot run group 1 (capturable), and group 0 used to be updated first."""
    opt, p = _setup(backend)
    snap = _snapshot(opt)
    _last_group(opt)["capturable"] = True
    with pytest.raises(BackendUnavailableError, match=r"capturable.*param_groups\[1\]"):
        opt.step()
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,match", [
    (dict(grad_scale=4.0), r"grad_scale must be a one-element tensor \(as torch.amp.GradScaler passes\), got float"),
    (dict(grad_scale=torch.ones(2)), r"grad_scale must be a one-element tensor, got shape \(2,\)"),
    (dict(grad_scale=torch.tensor(4)), r"grad_scale must be a floating-point tensor, got torch.int64"),
    (dict(grad_scale=torch.tensor(True)), r"grad_scale must be a floating-point tensor, got torch.bool"),
    (dict(found_inf=0.0), r"found_inf must be a one-element tensor \(as torch.amp.GradScaler passes\), got float"),
    (dict(found_inf=torch.zeros(2)), r"found_inf must be a one-element tensor, got shape \(2,\)"),
    (dict(found_inf=torch.zeros(1, dtype=torch.complex64)), r"found_inf must be a floating-point or bool tensor"),
    (dict(grad_scale=torch.tensor(2.0), found_inf=torch.zeros(())), None),  # fine: step taken
], ids=["gs_float", "gs_shape", "gs_int", "gs_bool", "fi_float", "fi_shape", "fi_complex", "ok"])
def test_amp_arguments_checked_before_anything(backend, kwargs, match):
    opt, p = _setup(backend)
    snap = _snapshot(opt)
    if match is None:
        opt.step(**kwargs)
        assert not opt.last_step_skipped and float(opt.state[p["a"]]["step"]) == 2
        return
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step(**kwargs)
    _assert_unchanged(opt, snap)


# ----------------------------------------------------------------------------- grad_scale / found_inf


@pytest.mark.parametrize("backend,capturable", _and_capturable())
@pytest.mark.parametrize("scale", [0.0, -0.0, -2.0, math.nan, math.inf, -math.inf], ids=str)
def test_bad_grad_scale_skips_the_step(backend, capturable, scale):
    """grad_scale <= 0 or non-finite used to give NaN params (0) or a ZeroDivisionError (triton):
    it is a skipped step, like a found_inf, without advancing step counts."""
    opt, p = _setup(backend, capturable=capturable)
    snap = _snapshot(opt)
    opt.step(grad_scale=torch.tensor(scale, device=DEVICE))
    assert opt.last_step_skipped
    _assert_unchanged(opt, snap, fresh_state_ok=capturable)
    opt.step(grad_scale=torch.tensor(2.0, device=DEVICE))  # a good scale afterwards: taken
    assert not opt.last_step_skipped
    assert float(opt.state[p["a"]]["step"]) == 2 and float(opt.state[p["fresh"]]["step"]) == 1
    assert all(torch.isfinite(q.detach().float()).all() for q in p.values())


@pytest.mark.parametrize("backend,capturable", _and_capturable())
@pytest.mark.parametrize("flag,skipped", [(math.nan, True), (1.0, True), (0.0, False), (-1.0, False)], ids=str)
def test_found_inf_means_the_same_on_every_backend(backend, capturable, flag, skipped):
    """found_inf > 0 or NaN skips, <= 0 takes the step. Capturable, the raw flag used to reach
    the kernels: triton masked the stores for -1 but advanced the step counts; a NaN flag gave
    NaN params (cuda-emu) or a ZeroDivisionError (triton, ref)."""
    opt, p = _setup(backend, capturable=capturable)
    snap = _snapshot(opt)
    opt.step(found_inf=torch.tensor([flag], device=DEVICE))
    assert opt.last_step_skipped == skipped
    if skipped:
        _assert_unchanged(opt, snap, fresh_state_ok=capturable)
    else:
        assert float(opt.state[p["a"]]["step"]) == 2 and not torch.equal(p["a"].detach(), snap["params"][0][1])
        assert all(torch.isfinite(q.detach().float()).all() for q in p.values())


def test_skipped_first_step_creates_no_state():
    p = torch.randn(3, device=DEVICE, requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = FusedAdam([p], backend="ref")
    opt.step(grad_scale=torch.tensor(0.0, device=DEVICE))
    assert opt.last_step_skipped and p not in opt.state


# ----------------------------------------------------------------------------- hyper-parameters


def _p():
    return torch.zeros(3, device=DEVICE, requires_grad=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), r"Invalid learning rate: lr must be a finite number >= 0, got -0.1"),
    (dict(lr=math.nan), r"Invalid learning rate: lr must be a finite"),
    (dict(lr=math.inf), r"Invalid learning rate: lr must be a finite"),
    (dict(lr=torch.tensor(-1.0)), r"Invalid learning rate: lr must be a finite number >= 0, got tensor -1.0"),
    (dict(lr=torch.tensor(math.nan)), r"Invalid learning rate: lr must be a finite"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), r"lr must be a one-element tensor, got shape \(2,\)"),
    (dict(lr=torch.tensor(1)), r"lr must be a floating-point tensor, got torch.int64"),
    (dict(lr="0.001"), r"lr must be a number or a one-element tensor, got '0.001' \(str\)"),
    (dict(lr=True), r"lr must be a number"),
    (dict(lr=None), r"lr must be a number"),
    (dict(eps=-1e-8), r"Invalid epsilon value: eps must be a finite number >= 0"),
    (dict(eps=math.inf), r"Invalid epsilon value: eps must be a finite"),
    (dict(eps=math.nan), r"Invalid epsilon value: eps must be a finite"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay value: weight_decay must be a finite"),
    (dict(weight_decay=math.inf), r"Invalid weight_decay value: weight_decay must be a finite"),
    (dict(betas=(1.0, 0.9)), r"Invalid beta parameter at index 0: betas\[0\] must be a number in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), r"Invalid beta parameter at index 1: betas\[1\] must be a number in \[0, 1\)"),
    (dict(betas=(0.9, math.nan)), r"betas\[1\] must be a number in \[0, 1\)"),
    (dict(betas=(torch.tensor(0.9), 0.99)), r"betas\[0\] must be a number, got tensor"),
    (dict(betas=(0.9, 0.99, 0.999)), r"betas must be a pair"),
    (dict(betas=0.9), r"betas must be a pair"),
    (dict(amsgrad="yes"), r"amsgrad must be a bool, got 'yes'"),
    (dict(capturable=None), r"capturable must be a bool"),
    (dict(master_weights=2), r"master_weights must be a bool"),
    (dict(backend="bogus"), r"backend must be one of .* or None, got 'bogus'"),
])
def test_constructor_refuses(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FusedAdam([_p()], **kwargs)


def test_torch_positional_order_is_caught():
    """torch.optim.AdamW's order (params, lr, betas, eps, weight_decay) given to apex's
    (params, lr, bias_correction, betas, ...) used to put the betas into bias_correction."""
    with pytest.raises(TypeError, match=r"bias_correction must be a bool, got \(0.9, 0.95\)"):
        FusedAdam([_p()], 1e-3, (0.9, 0.95))


@pytest.mark.parametrize("group,match", [
    (dict(lr=-0.1), r"param_groups\[1\]\['lr'\] must be a finite number >= 0, got -0.1"),
    (dict(lr=torch.tensor(-0.1)), r"param_groups\[1\]\['lr'\] must be a finite number >= 0, got tensor"),
    (dict(lr=torch.ones(2, 1)), r"param_groups\[1\]\['lr'\] must be a one-element tensor"),
    (dict(betas=(0.9, 1.0)), r"param_groups\[1\]\['betas'\]\[1\] must be a number in \[0, 1\)"),
    (dict(eps=-1.0), r"param_groups\[1\]\['eps'\] must be a finite"),
    (dict(weight_decay=math.nan), r"param_groups\[1\]\['weight_decay'\] must be a finite"),
    (dict(maximize=1.0), r"param_groups\[1\]\['maximize'\] must be a bool"),
    (dict(params=[torch.zeros(3, dtype=torch.float64, requires_grad=True)]),
     r"float32, float16 and bfloat16 params, got torch.float64 for param_groups\[1\]\['params'\]\[0\]"),
    (dict(params=[torch.zeros(4, 3, requires_grad=True).t()]),
     r"contiguous params: param_groups\[1\]\['params'\]\[0\]"),
    (dict(params=[1.0]), r"only optimize Tensors, but param_groups\[1\]\['params'\]\[0\] is float"),
])
def test_add_param_group_refuses_and_adds_nothing(group, match):
    """torch.optim checks only the constructor's defaults: a negative lr came in through here."""
    opt = FusedAdam([_p()])
    groups_before = list(opt.param_groups)
    group = {"params": [_p()], **group}
    with pytest.raises((ValueError, TypeError), match=match):
        opt.add_param_group(group)
    assert opt.param_groups == groups_before
    assert all(x is y for x, y in zip(opt.param_groups, groups_before))


def test_group_values_are_checked_in_the_constructor_too():
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] must be a finite number >= 0, got -1"):
        FusedAdam([{"params": [_p()]}, {"params": [_p()], "lr": -1}])


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_tensor_lr_works(backend):
    """A one-element tensor lr (also shape (1,)) gives the float lr's result."""
    results = []
    for lr in (1e-2, torch.tensor(1e-2), torch.tensor([1e-2])):
        torch.manual_seed(0)
        p = torch.randn(5, device=DEVICE, requires_grad=True)
        opt = FusedAdam([p], lr=lr, backend=backend)
        for _ in range(2):
            p.grad = torch.ones_like(p)
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1.0, 0.999999, 1.0000001, -1e-300, 1e-300, 10**400]),
    st.integers(min_value=-3, max_value=3),
)
KEYS = st.sampled_from(["lr", "beta1", "beta2", "eps", "weight_decay"])


def _valid(key, value) -> bool:
    v = float(value) if not isinstance(value, int) or abs(value) < 10**300 else math.inf
    if key in ("beta1", "beta2"):
        return 0.0 <= v < 1.0
    return math.isfinite(v) and v >= 0.0


def _kwargs(key, value) -> dict:
    if key == "beta1":
        return {"betas": (value, 0.999)}
    if key == "beta2":
        return {"betas": (0.9, value)}
    return {key: value}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=KEYS, value=VALUES, as_tensor=st.booleans())
def test_hyperparameter_rules_everywhere(key, value, as_tensor):
    """The same rule in the constructor, in add_param_group and for a value a scheduler assigns
    between steps; at least as strict as torch.optim.AdamW (what we accept, torch accepts)."""
    if as_tensor and key == "lr" and isinstance(value, float):
        value = torch.tensor(value, dtype=torch.float64)
    valid = _valid(key, value)
    event("valid" if valid else "invalid")
    kw = _kwargs(key, value)
    group_key = "betas" if key.startswith("beta") else key
    name = {"beta1": r"\['betas'\]\[0\]", "beta2": r"\['betas'\]\[1\]"}.get(key, rf"\['{key}'\]")
    arg_name = {"beta1": r"betas\[0\]", "beta2": r"betas\[1\]"}.get(key, key)

    # constructor
    if valid:
        FusedAdam([_p()], **kw)
        if isinstance(value, float):  # at least as strict as torch (which also refuses int betas: a type rule)
            torch.optim.AdamW([_p()], **kw)
    else:
        with pytest.raises(ValueError, match=rf"(^|: ){arg_name} must be"):
            FusedAdam([_p()], **kw)

    # add_param_group
    opt = FusedAdam([_p()], backend="ref")
    if valid:
        opt.add_param_group({"params": [_p()], **kw})
        assert len(opt.param_groups) == 2
    else:
        with pytest.raises(ValueError, match=rf"param_groups\[1\]{name} must be"):
            opt.add_param_group({"params": [_p()], **kw})
        assert len(opt.param_groups) == 1

    # assigned between steps (as a scheduler does): checked by step() before it writes anything
    a, b = _p(), _p()
    opt = FusedAdam([{"params": [a]}, {"params": [b]}], backend="ref")
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    snap = _snapshot(opt)
    opt.param_groups[1][group_key] = kw[group_key]
    if valid:
        opt.step()
    else:
        with pytest.raises(ValueError, match=rf"param_groups\[1\]{name} must be"):
            opt.step()
        _assert_unchanged(opt, snap)


# ----------------------------------------------------------------------------- duplicates, overlap, state


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_twice_in_one_group_is_refused(backend):
    """FusedAdam([p, p]) used to update p twice per step (torch only warns)."""
    p = _p()
    with pytest.raises(ValueError, match=r"appears twice in one parameter group: param_groups\[0\]\['params'\]\[1\] "
                                         r"is param_groups\[0\]\['params'\]\[0\]"):
        FusedAdam([p, p], backend=backend)


def test_a_param_in_two_groups_is_refused():
    p, q = _p(), _p()
    with pytest.raises(ValueError, match=r"some parameters appear in more than one parameter group: "
                                         r"param_groups\[1\]\['params'\]\[1\] is param_groups\[0\]\['params'\]\[0\]"):
        FusedAdam([{"params": [p]}, {"params": [q, p]}])
    opt = FusedAdam([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1


def test_overlapping_params_are_refused():
    w = torch.zeros(8, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        part = w[2:6]
    part.requires_grad_()
    with pytest.raises(ValueError,
                       match=r"param_groups\[0\]\['params'\]\[1\] overlaps param_groups\[0\]\['params'\]\[0\]"):
        FusedAdam([w, part])
    with torch.no_grad():  # views of one buffer that do not overlap are fine
        lo, hi = w[:4], w[4:]
    FusedAdam([lo.requires_grad_(), hi.requires_grad_()])


def test_state_of_the_wrong_shape_from_load_state_dict():
    """load_state_dict checks no shapes: a state from another model used to fail in the kernel
    after earlier buckets were updated."""
    opt, p = _setup("ref")
    sd = opt.state_dict()
    sd["state"][5]["exp_avg_sq"] = torch.zeros(3)  # param d is (2, 3)
    opt.load_state_dict(sd)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=r"state of param_groups\[1\]\['params'\]\[1\]: exp_avg_sq must be"):
        opt.step()
    _assert_unchanged(opt, snap)


def test_master_param_state_for_a_float32_param_is_refused():
    opt, p = _setup("ref")
    opt.state[p["a"]]["master_param"] = p["a"].detach().clone()
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=r"state of param_groups\[0\]\['params'\]\[0\] holds a master_param"):
        opt.step()
    _assert_unchanged(opt, snap)


def test_failed_lazy_state_init_is_rolled_back(monkeypatch):
    """If creating the state fails midway (e.g. out of memory), the state created so far goes."""
    opt, p = _setup("ref")
    snap = _snapshot(opt)
    real = FusedAdam._init_state

    def init_then_fail(self, param, group, journal):
        state = real(self, param, group, journal)
        if param is p["fresh"]:
            raise MemoryError("simulated")
        return state

    monkeypatch.setattr(FusedAdam, "_init_state", init_then_fail)
    with pytest.raises(MemoryError):
        opt.step()
    _assert_unchanged(opt, snap)
