"""Static GPU report: what the compiled kernels will use on an A100 / H100, without a GPU.

    python -m phi_kernels.inspect            # table of every CUDA kernel in phi_kernels._C
    python -m phi_kernels.inspect --json out.json

Reads the built extension with cuobjdump (shipped in Triton's wheel): registers, shared
memory, stack and local memory (spills) per kernel per architecture, tensor-core instruction
counts (HMMA on sm_80, HGMMA on sm_90a) and local-memory instructions (LDL/STL) in the SASS,
and an occupancy estimate from registers and shared memory. These are static facts of the
compiled code, not measurements of speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys

# Per-SM limits (CUDA occupancy calculator): sm_80 (A100) and sm_90 (H100).
SM_LIMITS = {
    "sm_80": {"regs": 65536, "smem": 164 * 1024, "smem_per_block": 163 * 1024, "warps": 64, "blocks": 32},
    "sm_90a": {"regs": 65536, "smem": 228 * 1024, "smem_per_block": 227 * 1024, "warps": 64, "blocks": 32},
}
SM_LIMITS["sm_90"] = SM_LIMITS["sm_90a"]


@dataclasses.dataclass
class KernelResources:
    name: str  # demangled
    mangled: str
    arch: str
    registers: int
    shared: int  # static shared memory, bytes
    stack: int
    local: int  # local memory per thread: spills and local arrays
    hmma: int = 0  # mma.sync tensor-core instructions in the SASS
    hgmma: int = 0  # Hopper warpgroup MMA
    ldl_stl: int = 0  # local-memory loads and stores in the SASS

    @property
    def spill_bytes(self) -> int:
        return self.local

    def max_warps_per_sm(self, threads_per_block: int | None = None, dynamic_smem: int = 0) -> int:
        """Occupancy bound from registers (and shared memory when the block size is known)."""
        lim = SM_LIMITS.get(self.arch, SM_LIMITS["sm_80"])
        regs_per_warp = max(self.registers, 1) * 32
        regs_per_warp = (regs_per_warp + 255) // 256 * 256  # allocation granularity
        warps = min(lim["regs"] // regs_per_warp, lim["warps"])
        if threads_per_block:
            wpb = (threads_per_block + 31) // 32
            blocks = min(warps // wpb, lim["blocks"])
            smem = self.shared + dynamic_smem
            if smem:
                blocks = min(blocks, lim["smem"] // smem)
            warps = blocks * wpb
        return warps


def _tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: Triton's wheel ships them; else the CUDA toolkit or PATH."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    for prefix in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if prefix and os.path.isfile(os.path.join(prefix, "bin", name)):
            return os.path.join(prefix, "bin", name)
    return shutil.which(name)


def extension_path() -> str | None:
    import phi_kernels

    found = glob.glob(os.path.join(os.path.dirname(phi_kernels.__file__), "_C*.so"))
    return found[0] if found else None


def extension_has_cuda() -> bool:
    from phi_kernels import _extension

    return _extension.cuda_compiled()


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


@functools.lru_cache(maxsize=4)
def cuda_kernels(so_path: str | None = None) -> tuple[KernelResources, ...]:
    """Every kernel in the extension's fatbin, per architecture."""
    so_path = so_path or extension_path()
    cuobjdump = _tool("cuobjdump")
    if so_path is None or cuobjdump is None:
        raise RuntimeError(f"need the built extension ({so_path}) and cuobjdump ({cuobjdump})")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", so_path], capture_output=True, text=True,
                           check=True).stdout
    kernels: dict[tuple[str, str], KernelResources] = {}
    arch = None
    current = None
    for line in usage.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and line.endswith(":"):
            current = line[len("Function "):-1]
        elif current and line.startswith("REG:"):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            kernels[(arch, current)] = KernelResources(
                name=current, mangled=current, arch=arch, registers=int(fields["REG"]),
                shared=int(fields["SHARED"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]))
            current = None
    sass = subprocess.run([cuobjdump, "-sass", so_path], capture_output=True, text=True, check=True).stdout
    arch = None
    current = None
    for line in sass.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif s.startswith("Function : "):
            current = kernels.get((arch, s[len("Function : "):].strip()))
        elif current is not None and s.startswith("/*"):
            op = s.split("*/", 1)[-1].strip().lstrip("@!P0123456789 T").split(" ")[0]
            if op.startswith("HMMA"):
                current.hmma += 1
            elif op.startswith("HGMMA"):
                current.hgmma += 1
            elif op.startswith(("LDL", "STL")):
                current.ldl_stl += 1
    names = _demangle([k.mangled for k in kernels.values()])
    for k in kernels.values():
        k.name = names.get(k.mangled, k.mangled)
    return tuple(sorted(kernels.values(), key=lambda k: (k.name, k.arch)))


def format_table(kernels) -> str:
    rows = ["| kernel | arch | regs | smem (B) | stack | spill (B) | LDL/STL | HMMA | HGMMA | warps/SM (regs) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        short = re.sub(r"\(.*\)$", "", k.name)
        rows.append(f"| `{short}` | {k.arch} | {k.registers} | {k.shared} | {k.stack} | {k.spill_bytes} | "
                    f"{k.ldl_stl} | {k.hmma} | {k.hgmma} | {k.max_warps_per_sm()} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if not extension_has_cuda():
        print("phi_kernels._C has no CUDA kernels (built without CUDA); nothing to inspect", file=sys.stderr)
        return 1
    kernels = cuda_kernels()
    print("Static resource usage of the CUDA kernels in phi_kernels._C (from cuobjdump; not a measurement)\n")
    print(format_table(kernels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(k) for k in kernels], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
