"""TrainConfig: every knob of a run in one typed dataclass. The command line is generated from it
by transformers.HfArgumentParser (each field's help and default appear in --help), and a run is
resolved in layers, each overriding the one before:

    dataclass defaults (the tiny CPU run) < the model's recipe (RECIPES, when --model names one,
    on the command line or in the --config file) < the --config JSON file < the command line

Budget and batch fields come in pairs of which one layer sets one: --tokens or --max-steps, and
--global-batch-size or --grad-accum; a layer that sets one clears the other from the layers
below (both in one layer is an error). resolve() then derives the other half for a world size:
grad_accum = global_batch_size / (micro_batch_size x world) and max_steps = ceil(tokens /
(global batch x seq_len)). validate() checks every field, naming its flag, before any process
group, data preparation or model allocation; deepspeed_config() is the one place the DeepSpeed
JSON is written (batch sizes defined once: micro x accum x world = global batch).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

PHI15_TOKENS = 150e9  # the paper's phi-1.5 budget: 150B tokens
PHI15_GLOBAL_BATCH = 2048  # sequences of 2048 tokens per optimizer step


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = _f("tiny", "a phi_model preset (tiny, small, phi-1, phi-1.5, phi-2) or a config.json path; "
                            "phi-1.5 brings the paper's recipe (see RECIPES in train/config.py)")
    data: str = _f("data/stdlib", "directory of shards from train/prepare_data.py (the default is prepared from "
                                  "the embedded Python stdlib corpus on first use)")
    out_dir: str = _f("out", "checkpoints, metrics.jsonl, tensorboard, the resolved config and the final export")
    max_steps: int | None = _f(300, "optimizer steps to train (exclusive with --tokens)")
    tokens: float | None = _f(None, "token budget, e.g. 150e9: max_steps = ceil(tokens / (global batch x seq_len)) "
                                    "(exclusive with --max-steps)")
    seed: int = _f(1337, "seed of the model init, the data order and every RNG")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --out-dir")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage 0-3 (3 partitions the parameters too; export gathers them)")
    offload_optimizer: Literal["none", "cpu"] = _f("none", "ZeRO-Offload: cpu keeps the optimizer states on the "
                                                           "host and steps them with FusedAdam's CPU kernel")
    micro_batch_size: int = _f(8, "sequences per rank per forward/backward")
    grad_accum: int | None = _f(1, "micro-batches per optimizer step (exclusive with --global-batch-size)")
    global_batch_size: int | None = _f(None, "sequences per optimizer step over all ranks; grad_accum = this / "
                                             "(micro-batch x world), which must divide (exclusive with --grad-accum)")
    seq_len: int = _f(256, "tokens per training sequence")
    lr: float = _f(2e-3, "peak learning rate")
    min_lr: float = _f(2e-4, "final learning rate of the cosine schedule")
    schedule: Literal["constant", "cosine"] = _f("constant", "learning-rate schedule after warmup")
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (not on biases and LayerNorm weights)")
    beta1: float = _f(0.9, "Adam beta1 (decay of the gradient average)")
    beta2: float = _f(0.98, "Adam beta2 (decay of the squared-gradient average)")
    eps: float = _f(1e-7, "Adam epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clipping (0 = off)")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _f(
        "auto", "auto = bf16 on a GPU, fp32 on CPU; fp16 uses DeepSpeed's dynamic loss scaling")
    fused_loss: bool = _f(True, "fuse lm_head with the cross entropy (never materialises the logits)")
    document_attention: bool = _f(False, "no attention across EOS (documents packed in one sequence)")
    gradient_checkpointing: bool = _f(False, "recompute each layer in the backward (less activation memory)")
    log_interval: int = _f(10, "steps between logged metrics (the only host read-back of the loss)")
    eval_interval: int = _f(100, "steps between validation-loss evaluations")
    eval_batches: int = _f(8, "micro-batches per evaluation")
    save_interval: int = _f(100, "steps between checkpoints")
    keep_last: int = _f(2, "complete checkpoints kept")
    peak_tflops: float = _f(0.0, "per-device peak TFLOP/s for MFU; 0 = from the GPU name (A100/H100), none on CPU")
    optimizer_backend: str | None = _f(None, "FusedAdam backend: cuda, cuda-emu, triton, cpu, ref (default: the "
                                             "fastest available; cpu when the optimizer is offloaded)")
    dry_run: bool = _f(False, "print the resolved plan (parameters, tokens/step, steps, memory per GPU for ZeRO "
                              "0-3, wall time at --mfu) and exit: no data, no process group, no training")
    world_size: int | None = _f(None, "GPUs to plan for, with --dry-run only (a run takes WORLD_SIZE from torchrun)")
    mfu: float = _f(0.4, "model FLOPs utilisation the --dry-run wall-time estimate assumes")


# The paper's phi-1.5 recipe: lr 2e-4 constant, no warmup, wd 0.1, betas (0.9, 0.98), eps 1e-7,
# clip 1.0, seq 2048, global batch 2048 sequences at any world size, 150B tokens, fp16 + ZeRO-2.
RECIPES: dict[str, dict] = {
    "phi-1.5": dict(lr=2e-4, min_lr=2e-4, schedule="constant", warmup_steps=0, weight_decay=0.1, beta1=0.9,
                    beta2=0.98, eps=1e-7, grad_clip=1.0, seq_len=2048, micro_batch_size=8,
                    global_batch_size=PHI15_GLOBAL_BATCH, tokens=PHI15_TOKENS, precision="fp16", zero_stage=2,
                    log_interval=10, eval_interval=1000, save_interval=1000),
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Resolved once here: HfArgumentParser rewrites the Field objects' .type when it builds a parser.
_TYPES = typing.get_type_hints(TrainConfig)
# Pairs of fields where a layer that sets one clears the other (see the module docstring).
_EXCLUSIVE = (("max_steps", "tokens"), ("grad_accum", "global_batch_size"))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_problem(name: str, value) -> str | None:
    """What is wrong with the type of TrainConfig.<name> = value, or None."""
    kind = _TYPES[name]
    args = typing.get_args(kind)
    if value is None and type(None) in args:
        return None
    if typing.get_origin(kind) is Literal:
        return None if value in args and isinstance(value, str) else f"expected one of {list(args)}, got {value!r}"
    base = next((a for a in args if a is not type(None)), kind)
    if base is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif base is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif base is float:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, str), "a string"
    if ok:
        return None
    optional = type(None) in args
    if optional and base is str:
        want += " or null"
    null = " (or null)" if optional and base is not str else ""
    return f"expected {want}, got {type(value).__name__} {value!r}{null}"


def build_parser():
    """The command line, generated from TrainConfig (HfArgumentParser: --flag-name and --flag_name,
    Literal fields as choices, bools as --flag / --flag false / --no-flag, defaults in --help)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig, description="phi pretraining with DeepSpeed ZeRO (see train/pretrain.py). "
                              "Precedence: defaults < the --model recipe < --config file < command line.")
    parser.add_argument("--config", default=None,
                        help="JSON file of TrainConfig fields (the command line overrides it)")
    return parser


def _explicit_flags(argv: list[str] | None) -> dict:
    """Only the fields the command line names (a parser whose defaults are all suppressed)."""
    quiet = build_parser()
    for action in quiet._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def _apply_layer(values: dict, layer: dict, where: str) -> None:
    for a, b in _EXCLUSIVE:
        if layer.get(a) is not None and layer.get(b) is not None:
            raise SystemExit(f"{where}: {flag(a)} and {flag(b)} both set ({layer[a]} and {layer[b]}); give one")
        if a in layer and b not in layer:
            values[b] = None
        if b in layer and a not in layer:
            values[a] = None
    values.update(layer)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the layers: defaults < recipe < --config file < command line. The recipe
    is looked up from the model the last two layers name, wherever it was given."""
    build_parser().parse_args(argv)  # --help, unknown flags and bad values exit here, with the usage
    cli = _explicit_flags(argv)
    config_path = cli.pop("config", None)
    from_file = read_config_file(config_path) if config_path else {}
    model = cli.get("model", from_file.get("model", TrainConfig.model))
    values = dataclasses.asdict(TrainConfig())
    _apply_layer(values, RECIPES.get(model, {}), f"the {model} recipe")
    _apply_layer(values, from_file, f"--config {config_path}")
    _apply_layer(values, cli, "the command line")
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
        raise SystemExit(f"{where}: unknown fields {sorted(unknown)} (known: {sorted(_FIELDS)})")
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


def resolve(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """A copy with grad_accum and max_steps derived for world_size ranks (the global batch and the
    token budget are kept as given). SystemExit naming the flags when they do not divide."""
    grad_accum, max_steps = cfg.grad_accum, cfg.max_steps
    per_step = cfg.micro_batch_size * world_size  # sequences per micro-step over all ranks
    if cfg.global_batch_size is not None:
        if cfg.global_batch_size % per_step:
            fits = [m for m in range(1, cfg.micro_batch_size + 1) if cfg.global_batch_size % (m * world_size) == 0]
            hint = (f"--micro-batch-size {fits[-1]} divides it at this world size" if fits else
                    f"{world_size} ranks do not divide it: use a world size that does")
            raise SystemExit(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                             f"{cfg.micro_batch_size} x {world_size} ranks = {per_step}; {hint}")
        grad_accum = cfg.global_batch_size // per_step
    if grad_accum is None:
        raise SystemExit("--grad-accum or --global-batch-size: one of them must be set")
    if cfg.tokens is not None:
        max_steps = math.ceil(cfg.tokens / (per_step * grad_accum * cfg.seq_len))
    if max_steps is None:
        raise SystemExit("--max-steps or --tokens: one of them must be set")
    return dataclasses.replace(cfg, grad_accum=grad_accum, max_steps=max_steps)


def validate(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Checks every field (SystemExit listing what to change, each naming its flag) and returns the
    config resolved for world_size (see resolve). Runs before any process group work, data
    preparation or model allocation. A --dry-run skips the checks of --data and --out-dir: it
    plans a run elsewhere and touches neither."""
    problems = []
    types = [f"{flag(k)} {p}" for k in _FIELDS if (p := _type_problem(k, getattr(cfg, k)))]
    if types:  # the checks below compare numbers: they need the types right first
        raise SystemExit("bad configuration:\n  " + "\n  ".join(types))
    model_cfg = None
    try:
        model_cfg = model_config(cfg.model)
    except SystemExit as e:
        problems.append(str(e))
    for name in ("max_steps", "micro_batch_size", "grad_accum", "global_batch_size", "seq_len", "log_interval",
                 "eval_interval", "eval_batches", "save_interval", "keep_last", "world_size"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            problems.append(f"{flag(name)} must be positive, got {v}")
    if cfg.tokens is not None and (not _finite(cfg.tokens) or cfg.tokens <= 0):
        problems.append(f"--tokens must be a finite number > 0, got {cfg.tokens}")
    if model_cfg is not None and cfg.seq_len > model_cfg.max_position_embeddings:
        problems.append(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                        f"({model_cfg.max_position_embeddings}, --model {cfg.model})")
    if not 0 <= cfg.seed < 2**32:
        problems.append(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        problems.append(f"--zero-stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    elif cfg.offload_optimizer == "cpu" and cfg.zero_stage == 0:
        problems.append("--offload-optimizer cpu needs --zero-stage 1, 2 or 3 (ZeRO-Offload partitions the "
                        "optimizer states it moves to the host)")
    if not _finite(cfg.lr) or cfg.lr <= 0:
        problems.append(f"--lr must be a finite number > 0, got {cfg.lr}")
    if not _finite(cfg.min_lr) or cfg.min_lr < 0 or (_finite(cfg.lr) and cfg.min_lr > cfg.lr):
        problems.append(f"--min-lr must be finite and in [0, --lr], got min_lr={cfg.min_lr}, lr={cfg.lr}")
    if cfg.warmup_steps < 0 or (cfg.max_steps is not None and cfg.warmup_steps >= cfg.max_steps):
        problems.append(f"--warmup-steps must be in [0, max_steps={cfg.max_steps}), got {cfg.warmup_steps}")
    for name in ("beta1", "beta2"):
        v = getattr(cfg, name)
        if not _finite(v) or not 0 <= v < 1:
            problems.append(f"{flag(name)} must be in [0, 1), got {v}")
    for name in ("eps", "weight_decay", "grad_clip", "peak_tflops"):
        v = getattr(cfg, name)
        if not _finite(v) or v < 0:
            problems.append(f"{flag(name)} must be a finite number >= 0, got {v}")
    if not _finite(cfg.mfu) or not 0 < cfg.mfu <= 1:
        problems.append(f"--mfu must be in (0, 1], got {cfg.mfu}")
    problems += _optimizer_backend_problems(cfg)
    if cfg.world_size is not None and not cfg.dry_run:
        problems.append(f"--world-size {cfg.world_size} is for --dry-run only: a run takes its world size from "
                        "torchrun (--nnodes x --nproc-per-node)")
    if cfg.dry_run and cfg.world_size is not None:
        world_size = cfg.world_size  # the plan's GPUs, not this process's WORLD_SIZE
    if not isinstance(world_size, int) or world_size < 1:
        problems.append(f"WORLD_SIZE must be a positive integer, got {world_size!r}")
        world_size = 1
    if not cfg.dry_run:
        problems += _place_problems(cfg, world_size)
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))
    resolved = resolve(cfg, world_size)
    if cfg.dry_run:
        resolved = dataclasses.replace(resolved, world_size=world_size)
    if resolved.warmup_steps >= resolved.max_steps:
        raise SystemExit(f"--warmup-steps must be below max_steps={resolved.max_steps}, got {cfg.warmup_steps}")
    return resolved


def _optimizer_backend_problems(cfg: TrainConfig) -> list[str]:
    if cfg.optimizer_backend is None:
        return []
    from phi_kernels import backend_status
    from phi_kernels._backends import BACKENDS

    if cfg.optimizer_backend not in BACKENDS:
        return [f"--optimizer-backend must be one of {', '.join(BACKENDS)}, got {cfg.optimizer_backend!r}"]
    if cfg.offload_optimizer == "cpu" and cfg.optimizer_backend not in ("cpu", "ref"):
        return [f"--optimizer-backend {cfg.optimizer_backend} cannot step an offloaded optimizer (its states live on "
                "the host): use cpu, or leave it unset"]
    st = backend_status(cfg.optimizer_backend)
    if not st.available:
        return [f"--optimizer-backend {cfg.optimizer_backend}: not available here ({st.reason})"]
    return []


def _place_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    """--out-dir and --data, for a real run."""
    problems = []
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        problems.append(f"--out-dir {cfg.out_dir}: exists and is not a directory")
    else:
        problems += _checkpoint_problems(cfg)
    meta_path = os.path.join(cfg.data, "meta.json")
    if cfg.data != TrainConfig.data and not os.path.exists(meta_path):
        problems.append(f"--data {cfg.data}: no prepared shards (meta.json); run "
                        f"python train/prepare_data.py --out {cfg.data} [--input FILES]")
    elif os.path.exists(meta_path):
        from phi_train.data import read_meta

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
    return problems


def _checkpoint_problems(cfg: TrainConfig) -> list[str]:
    """--resume needs a complete checkpoint; a fresh run must not write into another run's
    checkpoints (its saves would interleave with them and the pruning could drop its own)."""
    from phi_train.checkpoint import latest_tag

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
        raise SystemExit(f"--precision {cfg.precision} needs a GPU (this CPU has no fast 16-bit math); use fp32 "
                         "(or --dry-run to plan the GPU run)")
    return cfg.precision


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str, on_gpu: bool = True) -> dict:
    """The DeepSpeed JSON of a config resolved for world_size (validate / resolve). on_gpu: pin the
    host buffers of an offloaded optimizer (page-locked memory needs a GPU driver)."""
    if cfg.grad_accum is None or cfg.max_steps is None:
        raise ValueError("deepspeed_config needs a resolved TrainConfig (train.config.resolve)")
    zero: dict = {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our FusedAdam is a client optimizer
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        # The final export gathers the partitioned 16-bit parameters (train/pretrain.py).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        # Without this DeepSpeed insists on its own DeepSpeedCPUAdam; ours is FusedAdam's CPU kernel.
        ds["zero_force_ds_cpu_optimizer"] = False
    if precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds
