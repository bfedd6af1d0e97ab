"""Backend choice and the package's behaviour without its compiled extension."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import phi_kernels
from phi_kernels import BackendUnavailableError, available_backends, backend_status
from phi_kernels._backends import resolve_backend


def test_available_backends_reports_every_backend_with_a_reason():
    status = available_backends("cpu")
    assert list(status) == ["cuda", "triton", "cpu", "ref"]
    assert status["ref"].available
    for s in status.values():
        assert s.reason, s
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA tensors" in status["cuda"].reason


def test_auto_choice_prefers_native_kernels_on_cpu():
    expect = "cpu" if backend_status("cpu", "cpu").available else "ref"
    assert resolve_backend("op", torch.device("cpu"), None) == expect
    assert resolve_backend("op", torch.device("cpu"), None, supported=("triton", "ref")) == "ref"


def test_why_not_skips_in_auto_mode_and_raises_when_explicit():
    why_not = lambda b: "no dropout" if b == "cpu" else None  # noqa: E731
    assert resolve_backend("op", torch.device("cpu"), None, why_not=why_not) == "ref"
    if backend_status("cpu", "cpu").available:
        with pytest.raises(BackendUnavailableError, match="cannot run this call: no dropout"):
            resolve_backend("op", torch.device("cpu"), "cpu", why_not=why_not)
    with pytest.raises(BackendUnavailableError, match="does not implement it"):
        resolve_backend("op", torch.device("cpu"), "cpu", supported=("ref",))


def test_env_var_is_an_explicit_request(monkeypatch):
    monkeypatch.setenv("PHI_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PHI_KERNELS_BACKEND='nonsense' is not a backend"):
        resolve_backend("op", torch.device("cpu"), None)
    monkeypatch.setenv("PHI_KERNELS_BACKEND", "ref")
    assert resolve_backend("op", torch.device("cpu"), None) == "ref"
    assert resolve_backend("op", torch.device("cpu"), "ref") == "ref"


def test_package_imports_without_the_extension():
    """With phi_kernels._C unimportable, the package still imports, ref works, and asking for
    the native backends explains why they are unavailable."""
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "phi_kernels._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, Block())
        import torch, phi_kernels
        from phi_kernels import apply_rotary, rotary_cos_sin, BackendUnavailableError
        x = torch.randn(1, 4, 2, 64); cos, sin = rotary_cos_sin(4, 32)
        apply_rotary(x, cos, sin)  # auto: falls to ref
        try:
            apply_rotary(x, cos, sin, backend="cpu")
        except BackendUnavailableError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "simulated: extension not built" in out.stdout
    assert "pip install" in out.stdout


def test_version_and_exports():
    assert phi_kernels.__version__
    for name in phi_kernels.__all__:
        assert hasattr(phi_kernels, name), name
