"""Build phi_kernels._C, the C++/CUDA extension of phi-kernels (the rest of the packaging is in
pyproject.toml).

    pip install -r requirements-build.txt              # torch first: the extension compiles against it
    pip install --no-build-isolation -e ".[test]"

What gets built:
  * phi_kernels._C from every csrc/**/*.cpp file outside csrc/simt and csrc/tests (op schemas,
    bindings, CPU kernels): always;
  * ... plus every csrc/**/*.cu file (CUDA kernels): whenever torch is a CUDA build and a CUDA
    toolkit is found, even when no GPU is visible (CI compiles for sm_80 and sm_90a);
  * phi_kernels._simt from csrc/simt/*.cpp: the same CUDA kernels and CUDA host glue compiled
    as host C++ for the SIMT emulator (the "cuda-emu" backend, CPU tensors), whenever a CUDA
    toolkit's headers are found (cuda_fp16.h / cuda_bf16.h; no GPU, nvcc or CUDA torch needed).

Environment knobs (all optional):
  CUDA_HOME               the CUDA toolkit; found by itself when unset (see _find_cuda_home)
  TORCH_CUDA_ARCH_LIST    archs to compile for; default "8.0;9.0a" when no GPU is visible
  MAX_JOBS                parallel compile jobs (ninja)
  PHI_KERNELS_CUDA=0      skip the CUDA sources (CPU kernels only; a fast build for development)
  PHI_KERNELS_SIMT=0      skip the SIMT emulator (phi_kernels._simt)
  PHI_KERNELS_CPU_ARCH    -march of the C++ code, default "x86-64" (loads on any x86-64 CPU; the
                          CPU kernels are also built for AVX2 and AVX-512 and picked at run time,
                          PHI_KERNELS_CPU_CAPABILITY=baseline|avx2|avx512 overrides the choice)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(prefix):
    return bool(prefix) and os.path.isfile(os.path.join(prefix, "bin", "nvcc")) and os.path.isfile(
        os.path.join(prefix, "include", "cuda_runtime.h")
    )


def _find_cuda_home():
    """The real CUDA toolkit directory, or None.

    torch guesses CUDA_HOME from `which nvcc`, but on our machines that nvcc is a wrapper
    script in another prefix with no headers, so look for the directory whose bin/ has nvcc
    *and* whose include/ has cuda_runtime.h.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper like `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: follow it
            with open(nvcc, "r", errors="ignore") as f:
                for token in f.read(4096).split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for prefix in candidates:
        if _is_toolkit(prefix):
            return os.path.realpath(prefix)
    return None


def _want_cuda(cuda_home):
    if os.environ.get("PHI_KERNELS_CUDA", "1") == "0":
        print("phi_kernels: PHI_KERNELS_CUDA=0, building the CPU kernels only")
        return False
    import torch

    if torch.version.cuda is None:
        print("phi_kernels: torch is a CPU build, building the CPU kernels only")
        return False
    if cuda_home is None:
        print("phi_kernels: no CUDA toolkit found (set CUDA_HOME), building the CPU kernels only")
        return False
    return True


def _import_torch_from_target_env():
    """Make `import torch` work inside pip's isolated build environment.

    A plain `pip install -e .` builds in an isolated environment without torch, but the
    extension must be compiled against the torch it will run with, which is the one installed
    in the environment pip installs into (sys.prefix: pip runs this script with that
    environment's interpreter). Put that environment's site-packages back on the path rather
    than installing a second torch into the build environment.
    """
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    import site
    import sysconfig

    for path in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]:
        if path not in sys.path and os.path.isdir(os.path.join(path, "torch")):
            sys.path.append(path)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "phi-kernels: building the extension needs torch installed first:\n"
            "    pip install -r requirements-build.txt && pip install --no-build-isolation -e .\n"
            f"({e})"
        )


_import_torch_from_target_env()
cuda_home = _find_cuda_home()
if cuda_home and "CUDA_HOME" not in os.environ:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = _want_cuda(cuda_home)

# The CPU kernels (csrc/<op>/*_cpu.cpp) are compiled once per capability by the wrappers in
# csrc/cpu_isa (baseline, AVX2, AVX-512; the running CPU picks one), not directly.
cpp_sources = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    if os.sep + "tests" + os.sep not in p and os.sep + "simt" + os.sep not in p and not p.endswith("_cpu.cpp")
)
simt_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "simt", "*.cpp")))
cu_sources = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
)

cpu_arch = os.environ.get("PHI_KERNELS_CPU_ARCH", "x86-64")
# -fno-math-errno: sqrtf must not set errno, or GCC will not vectorize loops that call it.
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", f"-march={cpu_arch}", "-fno-math-errno", "-Wno-unused-function",
             "-Wno-psabi"]
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = []

if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for A100 (sm_80) and H100 (sm_90a, wgmma/TMA enabled).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
    # ATen's CUDA headers pull in cusparse.h and friends, which ship in torch's nvidia wheels.
    for site in sys.path:
        nv_inc = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(nv_inc):
            include_dirs.append(nv_inc)
            break
    define_macros.append(("PHI_WITH_CUDA", None))
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    ext = CUDAExtension(
        "phi_kernels._C",
        cpp_sources + cu_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "phi_kernels._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

ext_modules = [ext]
if cuda_home is not None and os.environ.get("PHI_KERNELS_SIMT", "1") != "0":
    # The CUDA kernels and their host glue as host C++ (PHI_SIMT): see csrc/simt/runtime.cpp.
    # Hidden visibility keeps its copies of the glue's inline functions and kernel templates
    # from binding to phi_kernels._C's, which are built from the same sources.
    ext_modules.append(
        CppExtension(
            "phi_kernels._simt",
            simt_sources,
            include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(cuda_home, "include")],
            define_macros=[("PHI_SIMT", None)],
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-fopenmp", "-fvisibility=hidden",
                                        "-fvisibility-inlines-hidden", "-fno-strict-aliasing",
                                        "-fno-math-errno", "-Wno-unused-function"]},
            extra_link_args=["-fopenmp"],
        )
    )
else:
    print("phi_kernels: no CUDA toolkit headers (or PHI_KERNELS_SIMT=0): not building the SIMT emulator")

# Name, version, dependencies, packages and console scripts: pyproject.toml.
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
