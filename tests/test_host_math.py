"""Builds and runs the standalone host tests of the math shared by the CUDA and CPU kernels
(CMakeLists.txt, csrc/tests/*_test.cpp) through cmake and ctest."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake/ctest not installed")
def test_host_math_ctest(tmp_path):
    build = tmp_path / "host"
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # noqa: E731
    cfg = run("cmake", "-S", ROOT, "-B", str(build))
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    bld = run("cmake", "--build", str(build), "-j2")
    assert bld.returncode == 0, bld.stdout[-4000:] + bld.stderr[-4000:]
    test = run("ctest", "--test-dir", str(build), "--output-on-failure")
    print(test.stdout)
    assert test.returncode == 0, test.stdout[-4000:] + test.stderr[-4000:]
    for name in ("rotary_math_test", "adam_math_test", "flash_math_test"):
        assert name in test.stdout
    assert "100% tests passed" in test.stdout
