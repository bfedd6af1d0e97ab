"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time.
With a GPU, tests run on CUDA tensors and the Triton kernels are compiled for real.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from phi_kernels import backend_status  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_backends(device: str = DEVICE) -> list:
    """Non-reference backends as pytest params, the unavailable ones skipped with the reason."""
    params = []
    for name in ("cuda", "triton", "cpu"):
        status = backend_status(name, device)
        marks = () if status.available else (pytest.mark.skip(reason=f"{name}: {status.reason}"),)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
