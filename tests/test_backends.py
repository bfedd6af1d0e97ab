"""Backend choice and the package's behaviour without its compiled extension."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import phi_kernels
from phi_kernels import BackendUnavailableError, _extension, available_backends, backend_status
from phi_kernels._backends import resolve_backend
from tests.conftest import subprocess_env


def test_available_backends_reports_every_backend_with_a_reason():
    status = available_backends("cpu")
    assert list(status) == ["cuda", "cuda-emu", "triton", "cpu", "ref"]
    assert status["ref"].available
    for s in status.values():
        assert s.reason, s
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA tensors" in status["cuda"].reason
    # str() is a table: the yes/no column lines up past the longest name ("cuda-emu").
    assert {str(s)[len("cuda-emu"):len("cuda-emu") + 5] for s in status.values()} <= {" yes ", " no  "}


def test_cuda_emu_is_listed_cpu_only_and_never_auto_chosen(monkeypatch):
    """cuda-emu (the CUDA kernels under the SIMT emulator) is a testing tool: listed with a
    reason, for CPU tensors only, used only when asked for."""
    cpu = torch.device("cpu")
    emu = available_backends("cpu")["cuda-emu"]
    assert emu.reason
    assert backend_status("cuda-emu") == emu  # device=None describes CPU tensors
    err = _extension.emu_load_error()
    if err is None:
        assert emu.available and "SIMT emulator" in emu.reason
    else:
        assert not emu.available and emu.reason == err and "phi_kernels._simt" in err and "pip install" in err
    # Never the automatic choice, even where it is the only kernel backend an op has.
    monkeypatch.delenv("PHI_KERNELS_BACKEND", raising=False)
    assert resolve_backend("op", cpu, None) in ("cpu", "ref")
    assert resolve_backend("op", cpu, None, supported=("cuda-emu", "ref")) == "ref"
    if emu.available:
        assert resolve_backend("op", cpu, "cuda-emu") == "cuda-emu"
        monkeypatch.setenv("PHI_KERNELS_BACKEND", "cuda-emu")
        assert resolve_backend("op", cpu, None) == "cuda-emu"
    else:
        with pytest.raises(BackendUnavailableError, match="phi_kernels._simt"):
            resolve_backend("op", cpu, "cuda-emu")
    # CUDA tensors: unavailable, whether or not this machine has a GPU.
    on_gpu = backend_status("cuda-emu", "cuda")
    assert not on_gpu.available and "CPU tensors only" in on_gpu.reason
    monkeypatch.delenv("PHI_KERNELS_BACKEND", raising=False)
    with pytest.raises(BackendUnavailableError, match="cuda-emu.*CPU tensors only"):
        resolve_backend("op", torch.device("cuda"), "cuda-emu")


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "simulated: extension not built" in out.stdout
    assert "pip install" in out.stdout


def test_package_imports_without_the_emulator():
    """With phi_kernels._simt unimportable, cuda-emu is unavailable with the import error and the
    build hint; everything else works as before."""
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "phi_kernels._simt":
                    raise ImportError("simulated: emulator not built")
        sys.meta_path.insert(0, Block())
        import torch, phi_kernels
        from phi_kernels import apply_rotary, rotary_cos_sin, backend_status, BackendUnavailableError
        print("STATUS", backend_status("cuda-emu", "cpu"))
        x = torch.randn(1, 4, 2, 64); cos, sin = rotary_cos_sin(4, 32)
        apply_rotary(x, cos, sin)  # auto: unaffected
        try:
            apply_rotary(x, cos, sin, backend="cuda-emu")
        except BackendUnavailableError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert "STATUS cuda-emu no " in out.stdout
    assert "ERR" in out.stdout and "simulated: emulator not built" in out.stdout
    assert "phi_kernels._simt" in out.stdout and "pip install" in out.stdout


def test_version_and_exports():
    assert phi_kernels.__version__
    for name in phi_kernels.__all__:
        assert hasattr(phi_kernels, name), name
