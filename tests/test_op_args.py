"""The per-op argument bundles (phi_kernels/_op_args.py) and the places that must agree with
them, so that adding an option cannot leave one behind: the C++ schemas (csrc/op_schemas.h) of
phi_kernels and of the emulator's phi_kernels_emu, the Python custom ops' schemas, and the one
C++ params builder of each op, which reads every option by name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from phi_kernels import _extension
from phi_kernels.flash_attn import FlashAttnArgs
from phi_kernels.rotary import RotaryArgs

ROOT = Path(__file__).resolve().parents[1]

# bundle -> (its C++ out-variant ops, its Python custom ops, the file of its params builder)
BUNDLES = {
    FlashAttnArgs: (("flash_attn_forward_out", "flash_attn_backward_out"),
                    ("flash_attn_forward", "flash_attn_backward"), "csrc/flash_attn/flash_attn_bind.h"),
    RotaryArgs: (("rotary_out",), ("rotary", "rotary_"), "csrc/rotary/rotary_bind.h"),
}
_IDS = [b.__name__ for b in BUNDLES]


def _namespaces() -> list[str]:
    found = []
    if _extension.load_error() is None:
        found.append("phi_kernels")
    if _extension.emu_load_error() is None:
        found.append("phi_kernels_emu")
    return found


def _check_schema(op, bundle, extra: str = "") -> None:
    """op's arguments other than plain tensors are exactly the bundle's fields (then `extra`),
    and the fields sit together, in order, between tensors (the callers pass them as
    *args.positional() between the op's tensors)."""
    schema = str(op.default._schema)
    inside = schema[schema.index("(") + 1:schema.rindex(") ->")]
    options = ", ".join(a for a in inside.split(", ") if not a.startswith(("Tensor ", "Tensor(")))
    assert options == bundle.schema() + extra, f"{schema}\nvs the bundle: {bundle.schema()}{extra}"
    assert f", {bundle.schema()}, " in schema, schema


@pytest.mark.parametrize("bundle", BUNDLES, ids=_IDS)
def test_cpp_schemas_take_the_bundle_fields_in_order(bundle):
    namespaces = _namespaces()
    if not namespaces:
        pytest.skip("neither phi_kernels._C nor phi_kernels._simt is built")
    cpp_ops, _, _ = BUNDLES[bundle]
    for namespace in namespaces:
        for op in cpp_ops:
            _check_schema(getattr(getattr(torch.ops, namespace), op), bundle)
    if "phi_kernels" in namespaces and bundle is FlashAttnArgs:  # the host-side plan op reads the same options
        _check_schema(torch.ops.phi_kernels.flash_attn_cuda_plan, bundle, ", bool backward")


@pytest.mark.parametrize("bundle", BUNDLES, ids=_IDS)
def test_python_custom_ops_take_the_bundle_fields_then_the_backend(bundle):
    _, custom_ops, _ = BUNDLES[bundle]
    for op in custom_ops:
        _check_schema(getattr(torch.ops.phi_kernels, op), bundle, ", str backend")


@pytest.mark.parametrize("bundle", BUNDLES, ids=_IDS)
def test_the_params_builder_reads_every_field(bundle):
    _, _, builder = BUNDLES[bundle]
    source = (ROOT / builder).read_text()
    read = set(re.findall(r'a\.(?:tensor|optional_tensor|integer|real|boolean)\("(\w+)"\)', source))
    assert set(bundle.names()) <= read, f"{builder} does not read {sorted(set(bundle.names()) - read)}"


def test_round_trip_through_the_positional_form():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    args = FlashAttnArgs(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3, max_seqlen_k=3, softmax_scale=0.5,
                         window_right=0, softcap=30.0, dropout_p=0.1, seed=7)
    again = FlashAttnArgs.from_positional(args.positional())
    assert again.positional()[2:] == args.positional()[2:] and again.cu_seqlens_q is cu and again.cu_seqlens_k is cu
    assert args.without_tensors().with_tensors(args.tensors()).positional()[:2] == (cu, cu)
    with pytest.raises(ValueError, match=f"FlashAttnArgs takes {len(FlashAttnArgs.names())} values"):
        FlashAttnArgs.from_positional(args.positional()[:-1])
    with pytest.raises(TypeError):  # keyword-only: no option can be passed by position by mistake
        RotaryArgs(None, 0, None, 8)  # type: ignore[misc]
