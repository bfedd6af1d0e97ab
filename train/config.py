"""TrainConfig: one place for every knob of a run, filled from presets, a config file and the
command line (in that order), validated before any process group exists, and turned into the
DeepSpeed config (batch sizes defined once: micro_batch x grad_accum x world = global batch)."""
from __future__ import annotations

import argparse
import dataclasses
import json
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


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description="phi pretraining with DeepSpeed ZeRO (see train/pretrain.py)")
    ap.add_argument("--config", help="JSON file of TrainConfig fields (the command line overrides it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
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
        if not os.path.isfile(config_path):
            raise SystemExit(f"--config {config_path}: no such file")
        with open(config_path) as f:
            file_values = json.load(f)
        unknown = set(file_values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise SystemExit(f"--config {config_path}: unknown fields {sorted(unknown)}")
        values.update(file_values)
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Raise SystemExit with what to change; runs before any process group work."""
    from phi_model.config import PRESETS

    problems = []
    if cfg.model not in PRESETS and not os.path.isfile(cfg.model):
        problems.append(f"--model {cfg.model!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a config.json file")
    for name in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_interval", "eval_interval",
                 "save_interval", "keep_last"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        problems.append(f"--zero-stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.precision not in ("auto", "fp32", "fp16", "bf16"):
        problems.append(f"--precision must be auto, fp32, fp16 or bf16, got {cfg.precision!r}")
    if cfg.schedule not in ("constant", "cosine"):
        problems.append(f"--schedule must be constant or cosine, got {cfg.schedule!r}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        problems.append(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if cfg.warmup_steps < 0 or cfg.warmup_steps >= cfg.max_steps:
        problems.append(f"--warmup-steps must be in [0, max_steps), got {cfg.warmup_steps}")
    meta = os.path.join(cfg.data, "meta.json")
    if cfg.data != TrainConfig.data and not os.path.exists(meta):
        problems.append(f"--data {cfg.data}: no prepared shards (meta.json); run "
                        f"python train/prepare_data.py --out {cfg.data} [--input FILES]")
    elif os.path.exists(meta):
        with open(meta) as f:
            m = json.load(f)
        windows = m["train_tokens"] // max(cfg.seq_len, 1)
        if windows < world_size * cfg.micro_batch_size:
            problems.append(f"--data {cfg.data} has {windows} training windows of {cfg.seq_len} tokens, fewer than "
                            f"{world_size} ranks x micro-batch {cfg.micro_batch_size}: use fewer ranks, a smaller "
                            "--micro-batch-size or --seq-len, or more data")
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))


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
