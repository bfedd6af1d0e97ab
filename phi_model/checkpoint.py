"""Checkpoint IO: Hugging Face phi directories (config.json + model.safetensors, sharded
index, or pytorch_model.bin) and Microsoft's original phi format, in; Hugging Face format
(safetensors) out. Format conversion lives here, beside the model, not inside it."""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

from phi_model.config import PhiConfig


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the keys and shapes."""


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    def path(name):
        return os.path.join(directory, name)

    if os.path.exists(path("model.safetensors")):
        return load_file(path("model.safetensors"))
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", lambda p: torch.load(p, weights_only=True,
                                                                                      map_location="cpu"))):
        if os.path.exists(path(index_name)):
            with open(path(index_name)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(loader(path(shard)))
            return state
    if os.path.exists(path("pytorch_model.bin")):
        # weights_only: a checkpoint is data, never code to unpickle.
        return torch.load(path("pytorch_model.bin"), weights_only=True, map_location="cpu")
    raise CheckpointError(f"{directory}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                          "or pytorch_model.bin.index.json found")


def _from_microsoft(state: dict[str, torch.Tensor], cfg: PhiConfig) -> dict[str, torch.Tensor]:
    """Microsoft's phi format (transformer.h.N.mixer.Wqkv, ...) -> transformers' names."""
    out = {}
    q_size = cfg.num_attention_heads * cfg.head_dim
    kv_size = cfg.num_key_value_heads * cfg.head_dim
    for key, t in state.items():
        if key == "transformer.embd.wte.weight":
            out["model.embed_tokens.weight"] = t
        elif key.startswith("lm_head.ln."):
            out["model.final_layernorm." + key.split(".")[-1]] = t
        elif key.startswith("lm_head.linear."):
            out["lm_head." + key.split(".")[-1]] = t
        elif m := re.match(r"transformer\.h\.(\d+)\.(.+)$", key):
            i, rest = m.groups()
            pre = f"model.layers.{i}."
            if rest.startswith("mixer.Wqkv."):  # fused (q; k; v) rows: split into thirds (or GQA sizes)
                kind = rest.split(".")[-1]
                q, k, v = torch.split(t, [q_size, kv_size, kv_size], dim=0)
                out[pre + f"self_attn.q_proj.{kind}"] = q
                out[pre + f"self_attn.k_proj.{kind}"] = k
                out[pre + f"self_attn.v_proj.{kind}"] = v
            elif rest.startswith("mixer.out_proj."):
                out[pre + "self_attn.dense." + rest.split(".")[-1]] = t
            elif rest.startswith("ln."):
                out[pre + "input_layernorm." + rest.split(".")[-1]] = t
            elif rest.startswith("mlp."):
                out[pre + rest] = t
            else:
                out[key] = t  # reported as unexpected below
        else:
            out[key] = t
    return out


def convert_state_dict(state: dict[str, torch.Tensor], cfg: PhiConfig) -> dict[str, torch.Tensor]:
    if any(k.startswith("transformer.") for k in state):
        return _from_microsoft(state, cfg)
    # transformers may prefix nothing or "model."; older exports used "transformer." (handled above).
    return state


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(parts))
    model.load_state_dict(state, strict=True)


def load_pretrained(cls, directory: str, *, dtype=None, device=None):
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory}: no config.json")
    cfg = PhiConfig.from_json(config_path)
    state = convert_state_dict(_read_weights(directory), cfg)
    model = cls(cfg)
    load_state_dict_checked(model, state)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def save_pretrained(model, directory: str) -> None:
    """config.json + model.safetensors in transformers' phi format (safetensors only)."""
    os.makedirs(directory, exist_ok=True)
    model.config.save(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
