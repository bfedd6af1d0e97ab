"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here.

Each Triton op module exposes `aot_specs() -> list[AotSpec]`: the kernel, its signature and
constexprs at phi-1.5 shapes, and the work one call does there (FLOPs, minimum bytes), which
the static report turns into a roofline time. `compile_spec` runs triton.compile for a
GPUTarget (sm_80, sm_90) with no GPU and no driver; it must run in a process where
TRITON_INTERPRET is unset (Triton reads it at import), which phi_kernels.inspect arranges.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any, Callable

# Modules whose aot_specs() the report collects.
SPEC_MODULES = ("phi_kernels.triton.rotary", "phi_kernels.triton.flash_attn_fwd", "phi_kernels.triton.flash_attn_bwd",
                "phi_kernels.triton.adam")


@dataclasses.dataclass
class AotSpec:
    label: str  # e.g. "rotary fwd fp16 hd64"
    fn: Callable
    signature: dict[str, str]  # runtime args only: {"X": "*fp16", "n": "i32"}
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    flops: float = 0.0  # one call at the phi-1.5 shape in `shape`
    min_bytes: float = 0.0
    shape: str = ""
    tensor_core: bool = False  # whether the kernel should use mma / wgmma
    attrs: dict = dataclasses.field(default_factory=dict)  # {(arg index,): [["tt.divisibility", 16]]}

    @staticmethod
    def type_name(dtype) -> str:
        """Triton's name of a torch dtype: torch.float16 -> "fp16"."""
        import torch

        return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64"}[dtype]

    @classmethod
    def of_launch(cls, label: str, launch, **work) -> AotSpec:
        """The spec of a launch the op's launcher builds (phi_kernels/triton/_launch.py), for
        tensors on the meta device, typed and specialised exactly as Triton's JIT does when the
        launch runs (its own native_specialize_impl): a tensor -> a pointer assumed 16-byte
        aligned, an int -> i32 / i64 with a divisibility-16 hint when it divides, an int equal to 1
        -> a constexpr, a float -> fp32, None -> a constexpr None; tile sizes, constexprs, warps
        and stages are the launch's own. work: flops, min_bytes, shape, tensor_core."""
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        names = launch.kernel.arg_names
        meta = dict(launch.meta)
        num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
        signature, constexprs, attrs = {}, dict(meta), {}
        if len(launch.args) + len(meta) != len(names):
            raise ValueError(f"{label}: {len(launch.args)} arguments and {len(meta)} constexprs for the "
                             f"{len(names)} parameters of {launch.kernel.__name__}")
        for index, (name, value) in enumerate(zip(names, launch.args)):
            try:  # (type, specialisation): ("*fp16", "D"), ("i32", ""), ("constexpr", 1), ...
                kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
            except Exception as e:
                raise TypeError(f"{label}: no Triton type for argument {name} = {value!r} ({e})") from None
            if kind == "constexpr":
                constexprs[name] = spec
                continue
            signature[name] = kind
            if spec == "D":
                attrs[(index,)] = [["tt.divisibility", 16]]
        return cls(label, launch.kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                   attrs=attrs, **work)


@dataclasses.dataclass
class AotResult:
    label: str
    kernel: str
    arch: str
    registers: int
    spill_bytes: int
    stack: int
    shared: int
    mma: int  # mma.sync in the PTX (sm_80 style)
    wgmma: int  # wgmma in the PTX (Hopper)
    hmma_sass: int  # HMMA / HGMMA in the SASS
    num_warps: int
    flops: float
    min_bytes: float
    shape: str
    tensor_core: bool


def collect_specs() -> list[AotSpec]:
    import importlib

    return [spec for name in SPEC_MODULES for spec in importlib.import_module(name).aot_specs()]


def _cuobjdump(cubin: bytes, flag: str) -> str:
    from phi_kernels.inspect import _tool

    tool = _tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def compile_spec(spec: AotSpec, capability: int) -> AotResult:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run python -m phi_kernels.inspect)")
    import triton
    from triton.backends.compiler import GPUTarget

    sig = dict(spec.signature)
    sig.update({k: "constexpr" for k in spec.constexprs})
    src = triton.compiler.ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs), attrs=spec.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = k.asm["ptx"]
    usage = _cuobjdump(k.asm["cubin"], "--dump-resource-usage")
    usage_line = "REG:" + usage.split("REG:", 1)[1].splitlines()[0]  # "REG:38 STACK:0 SHARED:0 LOCAL:0 ..."
    fields = dict(re.findall(r"(\w+):(\d+)", usage_line))
    sass = _cuobjdump(k.asm["cubin"], "-sass")
    return AotResult(
        label=spec.label, kernel=k.metadata.name, arch=f"sm_{capability}", registers=int(fields["REG"]),
        spill_bytes=int(fields["LOCAL"]), stack=int(fields["STACK"]), shared=int(k.metadata.shared),
        mma=len(re.findall(r"\bmma\.sync", ptx)), wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        hmma_sass=len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass)), num_warps=spec.num_warps,
        flops=spec.flops, min_bytes=spec.min_bytes, shape=spec.shape, tensor_core=spec.tensor_core)


def compile_all(capabilities=(80, 90)) -> list[AotResult]:
    return [compile_spec(s, cap) for s in collect_specs() for cap in capabilities]
