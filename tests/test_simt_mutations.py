"""The SIMT emulator bites: deliberately broken copies of the CUDA flash attention kernels must
each be caught, by an emulator error or by a wrong result against fp64; and its runtime's own
checks (csrc/tests/simt_runtime_check.cpp: shuffles, atomics, deadlock, divergence, launch
limits, bounds, races) each fire.

Every case copies csrc/ to a temporary folder, applies one textual mutation to a kernel or
header, compiles csrc/tests/simt_flash_check.cpp (fp16, head_dim 64, forward + backward,
seqlen 80 so the last tile has a tail) against the copy with the emulator runtime, and runs it.
Exit code 0 = results right, 1 = wrong result, 2 = emulator error. The unmutated copy must
pass, or the harness proves nothing.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _cuda_include() -> str | None:
    """A CUDA toolkit include folder with cuda_fp16.h (the emulator needs only the headers)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for prefix in candidates:
        if prefix and os.path.isfile(os.path.join(prefix, "include", "cuda_fp16.h")):
            return os.path.join(prefix, "include")
    return None


CUDA_INCLUDE = _cuda_include()
CXX = shutil.which("g++")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CUDA_INCLUDE is None or CXX is None, reason="needs g++ and a CUDA toolkit's headers"),
]
FLAGS = ["-std=c++20", "-O1", "-fopenmp", "-DPHI_SIMT", "-fno-strict-aliasing", "-w"]


def _replace_once(path: str, old: str, new: str):
    def apply(root: Path):
        f = root / path
        text = f.read_text()
        assert text.count(old) >= 1, f"mutation anchor not found in {path}: {old!r}"
        f.write_text(text.replace(old, new, 1))
    return apply


def _move_wait_after_read(root: Path):
    """The forward's first cp.async.wait_group goes after the S = Q K^T that reads the K tile."""
    f = root / "flash_attn/flash_fwd_kernel.cuh"
    text = f.read_text()
    wait = "    cp_async_wait_all();\n    __syncthreads();  // K tile nb"
    gemm = "    warp_gemm_rs<kNTs, D, false, D>(acc_s, q_frag, sK, 0, lane);\n"
    assert wait in text and gemm in text
    text = text.replace(wait, "    __syncthreads();  // K tile nb", 1)
    text = text.replace(gemm, gemm + "    cp_async_wait_all();\n", 1)
    f.write_text(text)


MUTATIONS = {
    "no_syncthreads_fwd": _replace_once(
        "flash_attn/flash_fwd_kernel.cuh", "    __syncthreads();  // K tile nb is in shared memory", "    // (removed)"),
    "wait_group_after_read": _move_wait_after_read,
    "ldmatrix_row_off_by_one": _replace_once(
        "flash_attn/fragment_layout.h", "return {n0 + r + (i >> 1) * 8, k0 + (i & 1) * 8};",
        "return {n0 + r + 1 + (i >> 1) * 8, k0 + (i & 1) * 8};"),
    "global_read_past_sequence_end": _replace_once(
        "flash_attn/mma_sm80.cuh", "const bool valid = row0 + r < row_end;", "const bool valid = row0 + r <= row_end;"),
    "smem_one_chunk_short": _replace_once(
        "flash_attn/kernel_traits.h", "static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * 2;",
        "static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * 2 - 16;"),
    # Beyond the required five: the backward's barrier between writing P / dS and reading them.
    "no_syncthreads_bwd": _replace_once(
        "flash_attn/flash_bwd_kernel.cuh", "    __syncthreads();  // P and dS of the whole tile", "    // (removed)"),
}


@pytest.fixture(scope="module")
def runtime_object(tmp_path_factory) -> Path:
    """The emulator runtime, compiled once (it does not depend on the kernels)."""
    out = tmp_path_factory.mktemp("simt") / "runtime.o"
    subprocess.run([CXX, *FLAGS, f"-I{CSRC}", f"-I{CUDA_INCLUDE}", "-c", str(CSRC / "simt" / "runtime.cpp"), "-o",
                    str(out)], check=True, timeout=600)
    return out


def _build_and_run(tmp: Path, runtime_o: Path, mutate=None) -> subprocess.CompletedProcess:
    src = tmp / "csrc"
    shutil.copytree(CSRC, src)
    if mutate is not None:
        mutate(src)
    exe = tmp / "simt_flash_check"
    subprocess.run([CXX, *FLAGS, f"-I{src}", f"-I{CUDA_INCLUDE}", str(src / "tests" / "simt_flash_check.cpp"),
                    str(runtime_o), "-o", str(exe)], check=True, timeout=600, capture_output=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)


def test_unmutated_kernels_pass(tmp_path, runtime_object):
    res = _build_and_run(tmp_path, runtime_object)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "forward: max |out - ref|" in res.stdout and "backward:" in res.stdout


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_detected(tmp_path, runtime_object, name):
    res = _build_and_run(tmp_path, runtime_object, MUTATIONS[name])
    assert res.returncode in (1, 2), f"mutation {name} went undetected:\n{res.stdout}{res.stderr}"
    print(f"{name}: {res.stdout.strip()}")


def test_runtime_checks(tmp_path, runtime_object):
    exe = tmp_path / "simt_runtime_check"
    subprocess.run([CXX, *FLAGS, f"-I{CSRC}", f"-I{CUDA_INCLUDE}", str(CSRC / "tests" / "simt_runtime_check.cpp"),
                    str(runtime_object), "-o", str(exe)], check=True, timeout=600, capture_output=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "0 failed" in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("\nok ") + res.stdout.startswith("ok ") >= 15, res.stdout
