"""Static GPU report: what the compiled kernels will use on an A100 / H100, without a GPU.

    python -m phi_kernels.inspect                 # CUDA kernels in phi_kernels._C + Triton AOT
    python -m phi_kernels.inspect --json out.json   #   + the emulator's execution counters

Triton kernels are compiled ahead of time for sm_80 and sm_90 (phi_kernels/triton/aot.py) and
read the same way. Each kernel with a known phi-1.5 workload also gets a roofline estimate:
time >= max(FLOPs / tensor peak, bytes / memory bandwidth) on an A100 and an H100, from
NVIDIA's published peaks (A100 80GB: 312 TFLOP/s dense fp16/bf16, 2.04 TB/s; H100 SXM: 989
TFLOP/s, 3.35 TB/s). A prediction from first principles, not a measurement.

The CUDA kernels are also executed in the SIMT emulator (phi_kernels/emu_counters.py): barriers,
tensor-core instructions, shared-memory bank conflicts and global coalescing per CTA, counted
while the kernels' own code runs, shown beside the static figures.

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
from types import SimpleNamespace

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


# Published peaks (NVIDIA datasheets): dense fp16/bf16 tensor FLOP/s and memory bandwidth.
PEAKS = {"A100 80GB": (312e12, 2.04e12), "H100 SXM": (989e12, 3.35e12)}

# Workload of one call at phi-1.5 shapes, for CUDA kernels matched by name (Triton kernels carry
# theirs in their AotSpec). (name regex, FLOPs, minimum bytes, shape description)
CUDA_WORKLOADS: list[tuple[str, float, float, str]] = [
    # q and k, batch 4, seqlen 2048, 32 heads x 64, rotary 32, 16-bit, out-of-place.
    (r"rotary_kernel<(__half|__nv_bfloat16)>", 2 * 6 * 4 * 2048 * 32 * 16, 2 * 2 * 4 * 2048 * 32 * 64 * 2 + 2 * 2048 * 16 * 2,
     "q,k (4, 2048, 32, 64), rotary 32"),
    # One AdamW step over all 1.42e9 phi-1.5 params: 28 B/param fp32, 30 B/param bf16 + fp32 master.
    (r"adam_kernel<float, false, false>", 12 * 1_418_270_720, 28 * 1_418_270_720, "1.42B params, fp32"),
    (r"adam_kernel<__nv_bfloat16, false, true>", 12 * 1_418_270_720, 30 * 1_418_270_720,
     "1.42B params, bf16 + fp32 master"),
    # Causal attention, batch 8, seqlen 2048, 32 heads x 64 (flash-attention's FLOP convention:
    # 4 b s^2 h d / 2 forward, 2.5x that backward); bytes: q, k, v, o (+ do, dq, dk, dv) once.
    (r"flash_fwd_kernel<phi::flash::Fwd_traits<64>", 4 * 8 * 2048**2 * 32 * 64 / 2, 4 * 8 * 2048 * 32 * 64 * 2,
     "causal (8, 2048, 32, 64)"),
    (r"flash_bwd_kernel<phi::flash::Bwd_traits<64>", 2.5 * 4 * 8 * 2048**2 * 32 * 64 / 2,
     8 * 8 * 2048 * 32 * 64 * 2 + 2 * 8 * 2048 * 32 * 64 * 4, "causal (8, 2048, 32, 64)"),
]


def roofline_us(flops: float, nbytes: float) -> dict[str, float]:
    """Lower bound on one call's time in microseconds per GPU in PEAKS."""
    return {gpu: 1e6 * max(flops / peak, nbytes / bw) for gpu, (peak, bw) in PEAKS.items()}


def cuda_workload(name: str) -> tuple[float, float, str] | None:
    for pattern, flops, nbytes, shape in CUDA_WORKLOADS:
        if re.search(pattern, name):
            return flops, nbytes, shape
    return None


def format_triton_table(results) -> str:
    rows = ["| Triton kernel | arch | warps | regs | smem (B) | spill (B) | mma / wgmma (PTX) | HMMA (SASS) | "
            "phi-1.5 call | roofline A100 / H100 (us) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        roof = roofline_us(r.flops, r.min_bytes) if r.min_bytes or r.flops else None
        roof_s = f"{roof['A100 80GB']:.0f} / {roof['H100 SXM']:.0f}" if roof else ""
        rows.append(f"| {r.label} (`{r.kernel}`) | {r.arch} | {r.num_warps} | {r.registers} | {r.shared} | "
                    f"{r.spill_bytes} | {r.mma} / {r.wgmma} | {r.hmma_sass} | {r.shape} | {roof_s} |")
    return "\n".join(rows)


def triton_results_subprocess() -> list[dict]:
    """AOT-compile every Triton kernel in a fresh process (TRITON_INTERPRET unset there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, dataclasses; from phi_kernels.triton.aot import compile_all; "
            "print(json.dumps([dataclasses.asdict(r) for r in compile_all()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"Triton AOT compilation failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(kernels) -> str:
    rows = ["| CUDA kernel | arch | regs | smem (B) | stack | spill (B) | LDL/STL | HMMA | HGMMA | warps/SM (regs) | "
            "phi-1.5 call | roofline A100 / H100 (us) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        short = re.sub(r"\(.*\)$", "", k.name)
        work = cuda_workload(k.name)
        roof = roofline_us(work[0], work[1]) if work else None
        roof_s = f"{roof['A100 80GB']:.0f} / {roof['H100 SXM']:.0f}" if roof else ""
        rows.append(f"| `{short}` | {k.arch} | {k.registers} | {k.shared} | {k.stack} | {k.spill_bytes} | "
                    f"{k.ldl_stl} | {k.hmma} | {k.hgmma} | {k.max_warps_per_sm()} | {work[2] if work else ''} | {roof_s} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton AOT compilation")
    ap.add_argument("--no-emulator", action="store_true", help="skip the SIMT emulator's execution counters")
    ap.add_argument("--emu-seqlen", type=int, default=2048,
                    help="attention seqlen of the emulated runs (default 2048, about 15 s on 2 cores)")
    args = ap.parse_args(argv)
    report: dict[str, list] = {"cuda": [], "triton": [], "emulator": []}
    print("# Static GPU report (cuobjdump on compiled code; roofline = max(FLOPs/peak, bytes/bandwidth); "
          "predictions, not measurements)\n")
    if extension_has_cuda():
        kernels = cuda_kernels()
        report["cuda"] = [dict(dataclasses.asdict(k), warps_per_sm=k.max_warps_per_sm()) for k in kernels]
        print(format_table(kernels))
    else:
        print("phi_kernels._C has no CUDA kernels (built without CUDA): CUDA section skipped")
    if not args.no_emulator:
        from phi_kernels import emu_counters
        from phi_kernels._extension import emu_load_error

        print()
        if emu_load_error() is None:
            rows = emu_counters.measure(args.emu_seqlen)
            report["emulator"] = [dataclasses.asdict(r) for r in rows]
            print(f"CUDA kernels executed in the SIMT emulator (attention: one causal (sequence, head) at seqlen "
                  f"{args.emu_seqlen}); counts, not timings\n")
            print(emu_counters.format_table(rows))
        else:
            print(f"SIMT emulator unavailable ({emu_load_error()}): execution counters skipped")
    if not args.no_triton:
        results = triton_results_subprocess()
        report["triton"] = results
        print()
        print(format_triton_table([SimpleNamespace(**r) for r in results]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
