"""One kernel launch as data: what a launcher passes to a Triton kernel. The launchers build
their launches with a function the static report calls too (phi_kernels/triton/aot.py compiles
each op's launches at phi-1.5 shapes on meta tensors), so the report compiles the tile sizes,
warps, stages and constexprs that run, not a copy of them."""
from __future__ import annotations

from typing import Any, NamedTuple


class Launch(NamedTuple):
    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: tuple  # the runtime arguments, positionally, in the kernel's parameter order
    meta: dict[str, Any]  # constexprs by name, plus num_warps and num_stages

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
