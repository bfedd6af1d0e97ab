"""Checkpoint IO: Hugging Face phi directories (config.json + model.safetensors, sharded
index, or pytorch_model.bin) and Microsoft's original phi format, in; Hugging Face format
(safetensors) out. Format conversion lives here, beside the model, not inside it."""
from __future__ import annotations

import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from phi_model.config import PhiConfig
from phi_model.json_file import read_json_object


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the keys and shapes."""


def _load_file_named(path: str, loader) -> dict[str, torch.Tensor]:
    """loader(path), with any failure (truncated file, bad header, missing shard) naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found")
    try:
        state = loader(path)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' SafetensorError, pickle/zip errors from torch.load, OSError
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return state


def _torch_load(p: str):
    # weights_only: a checkpoint is data, never code to unpickle.
    return torch.load(p, weights_only=True, map_location="cpu")


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    def path(name):
        return os.path.join(directory, name)

    if os.path.exists(path("model.safetensors")):
        return _load_file_named(path("model.safetensors"), load_file)
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _torch_load)):
        if os.path.exists(path(index_name)):
            try:
                index = read_json_object(path(index_name))
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{path(index_name)}: no \"weight_map\" object (tensor name -> shard file)")
            state = {}
            for shard in sorted(set(weight_map.values())):
                if os.path.isabs(shard) or os.path.normpath(shard).startswith(os.pardir):
                    raise CheckpointError(f"{path(index_name)}: shard {shard!r} is outside the checkpoint directory")
                state.update(_load_file_named(path(shard), loader))
            return state
    if os.path.exists(path("pytorch_model.bin")):
        return _load_file_named(path("pytorch_model.bin"), _torch_load)
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
    # Hugging Face's PhiForCausalLM keys ("model.layers.N...", "lm_head...") are this model's own:
    # nothing to rename. Microsoft's original export ("transformer.h.N...") is converted above.
    return state


def _mismatches(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                     f"{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        parts.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
    return parts


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parts = _mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)
    if parts:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(parts))
    model.load_state_dict(state, strict=True)


def load_pretrained(cls, directory: str, *, dtype=None, device=None):
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory}: no config.json")
    try:
        cfg = PhiConfig.from_json(config_path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None
    state = convert_state_dict(_read_weights(directory), cfg)
    model = cls(cfg)
    load_state_dict_checked(model, state)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model


# Files that hold weights: a save replaces them all (a stale shard set or pytorch_model.bin left
# beside the new model.safetensors would be a second, older copy of the model).
_WEIGHT_FILE = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                          r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json)$")
# dtypes safetensors stores
_SAVABLE = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
            torch.int8, torch.uint8, torch.bool, getattr(torch, "float8_e4m3fn", None),
            getattr(torch, "float8_e5m2", None)}


def _state_for_saving(model) -> dict[str, torch.Tensor]:
    """The state dict as it will be written, checked first: tensors with data (not on the meta
    device), dtypes safetensors stores, and the keys and shapes a model of model.config has (so
    what is written loads back)."""
    state = model.state_dict()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"cannot save: state dict entry {k} is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise CheckpointError(f"cannot save: {k} is on the meta device (it has no data)")
        if v.dtype not in _SAVABLE:
            raise CheckpointError(f"cannot save: {k} has dtype {v.dtype}, which safetensors does not store")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in type(model)(model.config).state_dict().items()}
    except Exception:
        expected = None  # not a model we can rebuild from its config: nothing to compare with
    if expected is not None:
        parts = _mismatches(expected, state)
        if parts:
            raise CheckpointError("cannot save: the weights do not match model.config (the checkpoint would not "
                                  "load):\n  " + "\n  ".join(parts))
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pretrained(model, directory: str, *, extra_files: dict[str, str] | None = None) -> None:
    """config.json + model.safetensors in transformers' phi format (safetensors only), plus
    extra_files ({name in the checkpoint: source path}, e.g. {"tokenizer.json": ...}).

    Nothing is written until everything is validated (config JSON-serialisable, weights savable
    and matching the config, extra files readable). Then the new checkpoint is written whole into
    a temporary sibling directory, fsynced, and swapped in with one atomic rename
    (phi_model.atomic.replace_directory): a reader, or a crash, sees the complete previous
    checkpoint or the complete new one. A failure at any point (the weights writer raising, a
    full disk) leaves an existing checkpoint byte-identical. Other files of an existing directory
    (README.md, tokenizer files not replaced here, ...) are carried over; stale weight files
    (pytorch_model.bin, old shards and their index) are not."""
    from phi_model.atomic import replace_directory

    config_text = model.config.to_json_string()  # ValueError naming the field, before any write
    state = _state_for_saving(model)
    extra = dict(extra_files or {})
    for name, src in extra.items():
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"extra_files: {name!r} must be a plain file name")
        if name == "config.json" or _WEIGHT_FILE.match(name):
            raise ValueError(f"extra_files: {name!r} is written by save_pretrained itself")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"extra_files[{name!r}]: {src} is not a file")
    written = {"config.json", "model.safetensors", *extra}

    def build(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(config_text)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, src in extra.items():
            shutil.copyfile(src, os.path.join(tmp, name))

    def keep(name: str) -> bool:  # entries of an existing directory carried over into the new one
        return name not in written and not _WEIGHT_FILE.match(name) and not name.startswith(".replace.tmp-")

    replace_directory(directory, build, keep=keep, order=["model.safetensors", "config.json"])
