"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time, for this
process; child processes get subprocess_env(), without it.
With a GPU, tests run on CUDA tensors and the Triton kernels are compiled for real.
"""
import os

import torch

# Whether TRITON_INTERPRET was set here (not by the user): then it is for this process's Triton
# tests only, and subprocess_env() leaves it out of child processes.
_INTERPRET_SET_HERE = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _INTERPRET_SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from phi_kernels import backend_status  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


KERNEL_BACKENDS = ("cuda", "cuda-emu", "triton", "cpu")

# Backends that run the CUDA C++ kernels, natively or under the SIMT emulator (phi_kernels._simt,
# on CPU tensors): they share the kernels' restrictions (flash attention: fp16/bf16, head_dim
# 64/128), so a test special-cases them together and every CUDA case also runs without a GPU.
CUDA_KERNELS = ("cuda", "cuda-emu")


def kernel_backends(device: str = DEVICE) -> list:
    """Non-reference backends as pytest params, the unavailable ones skipped with the reason.
    cuda-emu runs on CPU tensors only: on a GPU machine (tests on CUDA tensors) it is skipped,
    the real cuda backend runs those cases."""
    params = []
    for name in KERNEL_BACKENDS:
        status = backend_status(name, device)
        marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def kernel_backend(name: str, device: str = DEVICE):
    """One backend's pytest param from kernel_backends (skipped with the reason if unavailable)."""
    return next(p for p in kernel_backends(device) if p.values[0] == name)


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process under test (a CLI, a script, torchrun): this one's,
    without the TRITON_INTERPRET=1 set above. A child must run as a user's would: with the
    interpreter switched on, a child that wrongly picked the Triton backend still ran correctly,
    which is how a decoding bug once passed every test."""
    env = dict(os.environ)
    if _INTERPRET_SET_HERE:
        env.pop("TRITON_INTERPRET", None)
    env.update(overrides)
    return env


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
