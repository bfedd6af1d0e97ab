"""TrainConfig: one place for every knob of a run, filled from presets, a config file and the
command line (in that order), validated before any process group exists, and turned into the
DeepSpeed config (batch sizes defined once: micro_batch x grad_accum x world = global batch)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass


@dataclass
class TrainConfig:
    model: str = "tiny"  # a phi_model preset, or a config.json path
    data: str = "data/stdlib"  # shards from train/prepare_data.py (prepared here when it is the default)
    out_dir: str = "out"
    max_steps: int = 300
    seed: int = 1337
    resume: bool = False
    zero_stage: int = 2
    micro_batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-7
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (auto: bf16 on GPU, fp32 on CPU)
    document_attention: bool = False
    gradient_checkpointing: bool = False
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 100
    keep_last: int = 2
    peak_tflops: float = 0.0  # per device, for MFU; 0 = from the GPU name (A100/H100), none on CPU
    optimizer_backend: str | None = None  # FusedAdam backend (default: the fastest available)


# The paper's phi-1.5 recipe (shared/ANCHORS.md): lr 2e-4 constant, no warmup, wd 0.1,
# betas (0.9, 0.98), eps 1e-7, clip 1.0, seq 2048, global batch 2048 sequences, fp16 + ZeRO-2.
RECIPES = {
    "phi-1.5": dict(lr=2e-4, min_lr=2e-4, schedule="constant", seq_len=2048, micro_batch_size=8,
                    grad_accum=8, max_steps=150_000_000_000 // (2048 * 2048), precision="fp16", log_interval=10,
                    eval_interval=1000, save_interval=1000),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_problem(name: str, value) -> str | None:
    """What is wrong with the type of TrainConfig.<name> = value, or None."""
    f = _FIELDS[name]
    kind = str(f.type)
    if value is None and "None" in kind:
        return None
    if kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif kind == "int":
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind == "float":
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:  # str, str | None
        ok, want = isinstance(value, str), "a string" + (" or null" if "None" in kind else "")
    return None if ok else f"expected {want}, got {type(value).__name__} {value!r}"


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description="phi pretraining with DeepSpeed ZeRO (see train/pretrain.py)")
    ap.add_argument("--config", help="JSON file of TrainConfig fields (the command line overrides it)")
    for f in dataclasses.fields(TrainConfig):
        flag = _flag(f.name)
        if f.type == "bool" or isinstance(f.default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            ap.add_argument(flag, type=kind, default=None)
    args = vars(ap.parse_args(argv))
    values: dict = {}
    model = args.get("model") or TrainConfig.model
    values.update(RECIPES.get(model, {}))
    config_path = args.pop("config")
    if config_path:
        values.update(read_config_file(config_path))
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def read_config_file(path: str) -> dict:
    """A --config JSON file: every error names the file, and a field of the wrong type says what
    it expected."""
    where = f"--config {path}"
    if not os.path.isfile(path):
        raise SystemExit(f"{where}: no such file")
    from phi_model.json_file import read_json_object

    try:
        values = read_json_object(path, where, expected="a JSON object of TrainConfig fields")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise SystemExit(f"{where}: unknown fields {sorted(unknown)}")
    wrong = [f"field {k!r} {p}" for k, v in values.items() if (p := _type_problem(k, v))]
    if wrong:
        raise SystemExit(f"{where}: " + "; ".join(wrong))
    return values


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def model_config(model: str):
    """The PhiConfig a --model value names (a preset or a config.json file); SystemExit naming
    the flag and the file otherwise."""
    from phi_model.config import PRESETS, PhiConfig

    if model in PRESETS:
        return PhiConfig.from_name(model)
    if not os.path.isfile(model):
        raise SystemExit(f"--model {model!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a config.json file")
    try:
        return PhiConfig.from_json(model)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--model {e}") from None


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Raise SystemExit with what to change; runs before any process group work, data
    preparation or model allocation. Every problem names its flag."""
    problems = []
    types = [f"{_flag(k)} {p}" for k in _FIELDS if (p := _type_problem(k, getattr(cfg, k)))]
    if types:  # the checks below compare numbers: they need the types right first
        raise SystemExit("bad configuration:\n  " + "\n  ".join(types))
    model_cfg = None
    try:
        model_cfg = model_config(cfg.model)
    except SystemExit as e:
        problems.append(str(e))
    for name in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_interval", "eval_interval",
                 "eval_batches", "save_interval", "keep_last"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if model_cfg is not None and cfg.seq_len > model_cfg.max_position_embeddings:
        problems.append(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                        f"({model_cfg.max_position_embeddings}, --model {cfg.model})")
    if not 0 <= cfg.seed < 2**32:
        problems.append(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        problems.append(f"--zero-stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.precision not in ("auto", "fp32", "fp16", "bf16"):
        problems.append(f"--precision must be auto, fp32, fp16 or bf16, got {cfg.precision!r}")
    if cfg.schedule not in ("constant", "cosine"):
        problems.append(f"--schedule must be constant or cosine, got {cfg.schedule!r}")
    if not _finite(cfg.lr) or cfg.lr <= 0:
        problems.append(f"--lr must be a finite number > 0, got {cfg.lr}")
    if not _finite(cfg.min_lr) or cfg.min_lr < 0 or (_finite(cfg.lr) and cfg.min_lr > cfg.lr):
        problems.append(f"--min-lr must be finite and in [0, --lr], got min_lr={cfg.min_lr}, lr={cfg.lr}")
    if cfg.warmup_steps < 0 or cfg.warmup_steps >= cfg.max_steps:
        problems.append(f"--warmup-steps must be in [0, max_steps={cfg.max_steps}), got {cfg.warmup_steps}")
    for name in ("beta1", "beta2"):
        v = getattr(cfg, name)
        if not _finite(v) or not 0 <= v < 1:
            problems.append(f"{_flag(name)} must be in [0, 1), got {v}")
    for name in ("eps", "weight_decay", "grad_clip", "peak_tflops"):
        v = getattr(cfg, name)
        if not _finite(v) or v < 0:
            problems.append(f"{_flag(name)} must be a finite number >= 0, got {v}")
    if cfg.optimizer_backend is not None:
        from phi_kernels import backend_status
        from phi_kernels._backends import BACKENDS

        if cfg.optimizer_backend not in BACKENDS:
            problems.append(f"--optimizer-backend must be one of {', '.join(BACKENDS)}, got {cfg.optimizer_backend!r}")
        else:
            st = backend_status(cfg.optimizer_backend)
            if not st.available:
                problems.append(f"--optimizer-backend {cfg.optimizer_backend}: not available here ({st.reason})")
    if not isinstance(world_size, int) or world_size < 1:
        problems.append(f"WORLD_SIZE must be a positive integer, got {world_size!r}")
        world_size = 1
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        problems.append(f"--out-dir {cfg.out_dir}: exists and is not a directory")
    else:
        problems += _checkpoint_problems(cfg)
    meta_path = os.path.join(cfg.data, "meta.json")
    if cfg.data != TrainConfig.data and not os.path.exists(meta_path):
        problems.append(f"--data {cfg.data}: no prepared shards (meta.json); run "
                        f"python train/prepare_data.py --out {cfg.data} [--input FILES]")
    elif os.path.exists(meta_path):
        from train.data import read_meta

        try:
            m = read_meta(cfg.data)
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"--data {e}")
        else:
            windows = m["train_tokens"] // max(cfg.seq_len, 1)
            if windows < world_size * cfg.micro_batch_size:
                problems.append(f"--data {cfg.data} has {windows} training windows of {cfg.seq_len} tokens, fewer "
                                f"than {world_size} ranks x micro-batch {cfg.micro_batch_size}: use fewer ranks, a "
                                "smaller --micro-batch-size or --seq-len, or more data")
            val_windows = m["val_tokens"] // max(cfg.seq_len, 1)
            if val_windows < cfg.micro_batch_size:
                problems.append(f"--data {cfg.data} has {val_windows} validation windows of {cfg.seq_len} tokens, "
                                f"fewer than --micro-batch-size {cfg.micro_batch_size}: use a smaller --seq-len or "
                                "--micro-batch-size, or more data")
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))


def _checkpoint_problems(cfg: TrainConfig) -> list[str]:
    """--resume needs a complete checkpoint; a fresh run must not write into another run's
    checkpoints (its saves would interleave with them and the pruning could drop its own)."""
    from train.checkpoint import latest_tag

    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    try:
        tag = latest_tag(ckpt_dir)
    except RuntimeError as e:
        return [f"--out-dir {cfg.out_dir}: {e}"]
    if cfg.resume and tag is None:
        return [f"--resume: no complete checkpoint in {ckpt_dir}"]
    if not cfg.resume and tag is not None:
        return [f"--out-dir {cfg.out_dir} already holds a run's checkpoints (latest {tag}): pass --resume to continue "
                "it, or choose another --out-dir"]
    return []


def resolve_precision(cfg: TrainConfig, on_gpu: bool) -> str:
    if cfg.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if cfg.precision in ("fp16", "bf16") and not on_gpu:
        raise SystemExit(f"--precision {cfg.precision} needs a GPU (this CPU has no fast 16-bit math); use fp32")
    return cfg.precision


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,  # our FusedAdam is a client optimizer
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds
