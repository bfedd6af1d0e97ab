"""PhiConfig: the model's hyperparameters, named presets, and conversion from/to Hugging Face
config.json (both transformers' `phi` format and Microsoft's original `phi-msft` one)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field


@dataclass
class PhiConfig:
    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (phi-1.5 has no GQA)
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = 50256
    # derived in __post_init__
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("layer_norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.rotary_dim = int(self.partial_rotary_factor * self.head_dim)
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives rotary_dim {self.rotary_dim}; "
                             f"it must be even and in (0, head_dim={self.head_dim}]")

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_name(cls, name: str, **overrides) -> "PhiConfig":
        """Named presets: phi-1.5, phi-1, phi-2 (the shapes of microsoft/phi-1_5, phi-1, phi-2 on the
        Hugging Face Hub), and small ones for CPU work."""
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "PhiConfig":
        """From a config.json dict: transformers' `phi` (4.x or 5.x) or Microsoft's `phi-msft`."""
        if "n_embd" in cfg:  # Microsoft's original format (phi-msft / mixformer)
            head_dim = cfg["n_embd"] // cfg["n_head"]
            return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["n_embd"],
                       intermediate_size=cfg.get("n_inner") or 4 * cfg["n_embd"], num_hidden_layers=cfg["n_layer"],
                       num_attention_heads=cfg["n_head"], num_key_value_heads=cfg.get("n_head_kv"),
                       partial_rotary_factor=cfg.get("rotary_dim", head_dim) / head_dim,
                       max_position_embeddings=cfg.get("n_positions", 2048),
                       layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), resid_pdrop=cfg.get("resid_pdrop", 0.0),
                       embd_pdrop=cfg.get("embd_pdrop", 0.0), attention_dropout=cfg.get("attn_pdrop", 0.0))
        if cfg.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not phi's tanh GELU (gelu_new)")
        if cfg.get("qk_layernorm"):
            raise ValueError("qk_layernorm=True is not supported (no phi checkpoint uses it)")
        rope = cfg.get("rope_parameters") or {}
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kw = {k: v for k, v in cfg.items() if k in known}
        kw["partial_rotary_factor"] = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
        kw["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str) -> "PhiConfig":
        """From a config.json file; every error names the file."""
        from phi_model.json_file import read_json_object

        cfg = read_json_object(path, expected="a model config (a JSON object)")
        try:
            return cls.from_hf_config(cfg)
        except KeyError as e:
            raise ValueError(f"{path}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """transformers' PhiConfig format (loads in transformers 4.x and 5.x)."""
        return {
            "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "hidden_act": "gelu_new",
            "max_position_embeddings": self.max_position_embeddings, "layer_norm_eps": self.layer_norm_eps,
            "resid_pdrop": self.resid_pdrop, "embd_pdrop": self.embd_pdrop,
            "attention_dropout": self.attention_dropout, "partial_rotary_factor": self.partial_rotary_factor,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor},
            "qk_layernorm": False, "tie_word_embeddings": False, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "initializer_range": 0.02, "use_cache": True,
        }

    def to_json_string(self) -> str:
        """config.json's text; a ValueError naming the field when a value is not plain JSON (a
        numpy scalar, NaN, an object ...), raised before anything is written."""
        d = self.to_hf_dict()
        check_json_value(d, "config")
        return json.dumps(d, indent=2, allow_nan=False) + "\n"

    def save(self, directory: str) -> None:
        """Writes <directory>/config.json atomically (validated first; temp name, fsync, rename)."""
        from phi_model.atomic import atomic_write_text

        text = self.to_json_string()
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "config.json"), text)


def check_json_value(value, where: str) -> None:
    """Raises ValueError naming `where` (e.g. config.layer_norm_eps) for anything json.dump would
    reject or write as non-standard JSON: non-finite floats, numpy scalars, other objects."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{where} = {value!r} is not finite: JSON has no NaN or infinity")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json_value(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
            check_json_value(v, f"{where}.{k}")
        return
    raise ValueError(f"{where} = {value!r} ({type(value).__module__}.{type(value).__name__}) is not JSON-serialisable: "
                     "use a plain int, float, str, bool or None")


def _check_field_types(cfg: "PhiConfig") -> None:
    """Every field is the type it says (numpy numbers become Python numbers): 'hidden_size
    expected an int, got str '128'' instead of a TypeError from a comparison later."""
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        kind = str(f.type)
        if v is None and "None" in kind:
            continue
        if kind.startswith("int"):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"PhiConfig.{f.name} expected an int, got {type(v).__name__} {v!r}")
            setattr(cfg, f.name, int(v))
        elif kind.startswith("float"):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"PhiConfig.{f.name} expected a number, got {type(v).__name__} {v!r}")
            if not math.isfinite(float(v)):
                raise ValueError(f"PhiConfig.{f.name} must be finite, got {v!r}")
            setattr(cfg, f.name, float(v))


PRESETS: dict[str, dict] = {
    # microsoft/phi-1_5 and microsoft/phi-1 share the architecture (1.42B parameters).
    "phi-1.5": dict(),
    "phi-1": dict(),
    # microsoft/phi-2: head_dim 80, rotary 32 of 80.
    "phi-2": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, partial_rotary_factor=0.4,
                  resid_pdrop=0.1),
    # Trains on a 2-core CPU in minutes (7.36M parameters with an 8k vocabulary; tested).
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=1024),
    "small": dict(vocab_size=51200, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=2048),
}
