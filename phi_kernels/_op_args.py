"""One frozen dataclass per op holds the options its kernels are given (flash attention:
FlashAttnArgs, rotary: RotaryArgs). Inside the package they travel as that one object, passed by
keyword; only at the torch.library boundary do they become positional arguments, in the field
order, which is the order of the op's options in its C++ schema (the PHI_*_OPTIONS fragments of
csrc/op_schemas.h; tests/test_op_args.py checks the two agree). The C++ side reads them by name
(csrc/common/op_args.h), and the Python custom ops' schemas are written from the fields
(`schema()`), so an option is declared once per language.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

# Annotation (as written, `from __future__ import annotations`) -> torch schema type.
_SCHEMA_TYPES = {"Tensor | None": "Tensor?", "int": "int", "float": "float", "bool": "bool"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpArgs:
    """Base of the per-op bundles: subclasses declare fields only (frozen, keyword-only)."""

    @classmethod
    def _fields(cls) -> tuple[dataclasses.Field, ...]:
        cached = cls.__dict__.get("_FIELDS_CACHE")
        if cached is None:
            cached = dataclasses.fields(cls)
            setattr(cls, "_FIELDS_CACHE", cached)
        return cached

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls._fields())

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls._fields() if f.type == "Tensor | None")

    @classmethod
    def schema(cls) -> str:
        """The fields as a torch schema fragment: "Tensor? cu_seqlens_q, ..., int seed"."""
        return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in cls._fields())

    def positional(self) -> tuple[Any, ...]:
        """The values in schema order, for the torch.library boundary."""
        return tuple(getattr(self, f.name) for f in self._fields())

    @classmethod
    def from_positional(cls, values) -> OpArgs:
        names = cls.names()
        if len(values) != len(names):
            raise ValueError(f"{cls.__name__} takes {len(names)} values ({', '.join(names)}), got {len(values)}")
        return cls(**dict(zip(names, values)))

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The tensor fields (autograd saves them with save_for_backward)."""
        return tuple(getattr(self, n) for n in self.tensor_names())

    def without_tensors(self) -> OpArgs:
        return dataclasses.replace(self, **{n: None for n in self.tensor_names()})

    def with_tensors(self, tensors) -> OpArgs:
        return dataclasses.replace(self, **dict(zip(self.tensor_names(), tensors)))
