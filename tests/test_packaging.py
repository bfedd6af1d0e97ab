"""Packaging: what an install declares and provides (pyproject.toml, setup.py, MANIFEST.in).

A wheel built from a fresh clone and installed into a fresh venv was checked by hand (README,
"Quick start"); these tests keep the declarations from drifting: the installed metadata's
dependencies, extras and console scripts, the packages that get installed, and an sdist that
carries every C++/CUDA source setup.py compiles.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"phi-train", "phi-prepare-data", "phi-generate", "phi-evaluate", "phi-kernels-inspect"}


def test_installed_metadata_declares_dependencies_and_extras():
    dist = importlib.metadata.distribution("phi-kernels")
    import phi_kernels

    assert dist.version == phi_kernels.__version__  # one version source
    requires = dist.requires or []
    base = {r.split(";")[0].strip() for r in requires if "extra ==" not in r}
    assert {"torch==2.14.1", "numpy", "safetensors", "tokenizers", "transformers>=5.0", "tqdm"} <= base
    extras = set(dist.metadata.get_all("Provides-Extra") or [])
    assert {"train", "hf", "eval", "bench", "test"} <= extras
    assert any(r.startswith("deepspeed==") and 'extra == "train"' in r for r in requires)


def test_console_scripts_load():
    eps = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts") if e.name in SCRIPTS}
    assert set(eps) == SCRIPTS
    for e in eps.values():
        assert callable(e.load()), e


def test_only_the_three_packages_are_installed():
    from setuptools import find_packages

    top = {p.split(".")[0] for p in find_packages(ROOT, include=["phi_kernels*", "phi_model*", "phi_train*"])}
    assert top == {"phi_kernels", "phi_model", "phi_train"}
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert 'include = ["phi_kernels*", "phi_model*", "phi_train*"]' in text


@pytest.mark.timeout(300)
def test_sdist_carries_every_source_setup_py_compiles(tmp_path):
    egg_info = os.path.join(ROOT, "phi_kernels.egg-info")
    had_egg_info = os.path.exists(egg_info)
    try:
        subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"],
                       cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PHI_KERNELS_CUDA": "0"})
    finally:
        if not had_egg_info:  # setuptools writes it into the checkout; leave the checkout as it was
            shutil.rmtree(egg_info, ignore_errors=True)
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"requirements-build.txt", "pyproject.toml", "setup.py", "MANIFEST.in"} <= names
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    missing = sorted(set(tracked.stdout.split()) - names)
    assert not missing, f"the sdist lacks {missing[:10]}"
