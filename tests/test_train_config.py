"""train/config.py: the command line generated from TrainConfig, the layers (defaults < recipe <
--config file < command line), the phi-1.5 recipe's global batch at any world size, the token
budget, the DeepSpeed JSON, and bad values refused naming their flag. No process is started."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from phi_train.config import (PHI15_GLOBAL_BATCH, PHI15_TOKENS, RECIPES, TrainConfig, build_parser, deepspeed_config,
                          parse_args, resolve, validate)


def _write(tmp_path, obj) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_help_describes_every_field_with_its_default():
    parser = build_parser()
    by_dest: dict = {}
    for a in parser._actions:  # the first action of a dest (a bool's --no-flag complement comes after)
        by_dest.setdefault(a.dest, a)
    for f in dataclasses.fields(TrainConfig):
        action = by_dest[f.name]
        assert action.help and action.help.strip(), f.name
        assert action.default == f.default, f.name
        assert "--" + f.name.replace("_", "-") in action.option_strings, f.name
    text = parser.format_help()
    assert "--max-steps" in text and "(default: 300)" in text and "(default: tiny)" in text


@pytest.mark.parametrize("where", ["flag", "file"])
def test_phi15_recipe_from_flag_or_config_file(tmp_path, where):
    argv = ["--model", "phi-1.5"] if where == "flag" else ["--config", _write(tmp_path, {"model": "phi-1.5"})]
    cfg = parse_args(argv)
    assert (cfg.lr, cfg.min_lr, cfg.schedule, cfg.warmup_steps) == (2e-4, 2e-4, "constant", 0)
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.98, 1e-7, 0.1, 1.0)
    assert (cfg.seq_len, cfg.precision, cfg.zero_stage) == (2048, "fp16", 2)
    assert (cfg.global_batch_size, cfg.tokens, cfg.grad_accum, cfg.max_steps) == (2048, 150e9, None, None)


def test_layers_file_overrides_recipe_and_command_line_overrides_file(tmp_path):
    path = _write(tmp_path, {"model": "phi-1.5", "lr": 1e-4, "seq_len": 1024})
    assert parse_args(["--config", path]).lr == 1e-4
    cfg = parse_args(["--config", path, "--lr", "3e-4"])
    assert (cfg.lr, cfg.seq_len, cfg.precision) == (3e-4, 1024, "fp16")
    # The command line's model picks the recipe even when the file names another.
    assert parse_args(["--config", _write(tmp_path, {"model": "tiny"}), "--model", "phi-1.5"]).lr == 2e-4
    assert parse_args(["--model", "tiny"]).lr == TrainConfig.lr


def test_a_layer_setting_one_of_a_pair_clears_the_other(tmp_path):
    cfg = parse_args(["--model", "phi-1.5", "--max-steps", "10"])
    assert (cfg.max_steps, cfg.tokens) == (10, None)
    cfg = parse_args(["--config", _write(tmp_path, {"model": "phi-1.5", "grad_accum": 4})])
    assert (cfg.grad_accum, cfg.global_batch_size) == (4, None)
    cfg = parse_args(["--tokens", "1e6"])  # over the tiny default's max_steps
    assert (cfg.max_steps, cfg.tokens) == (None, 1e6)
    with pytest.raises(SystemExit, match="--max-steps and --tokens both set"):
        parse_args(["--max-steps", "5", "--tokens", "1e6"])
    with pytest.raises(SystemExit, match=r"--config .*--grad-accum and --global-batch-size both set"):
        parse_args(["--config", _write(tmp_path, {"grad_accum": 2, "global_batch_size": 64})])


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 64, 128, 256])
def test_phi15_keeps_2048_sequences_at_any_world_size(world):
    cfg = resolve(parse_args(["--model", "phi-1.5"]), world)
    assert cfg.micro_batch_size * cfg.grad_accum * world == PHI15_GLOBAL_BATCH == 2048
    assert cfg.grad_accum == 2048 // (8 * world)
    # 150e9 / (2048 sequences x 2048 tokens) = 35762.7: the budget is covered by 35763 steps.
    assert cfg.max_steps == 35763 == math.ceil(PHI15_TOKENS / (2048 * 2048))


def test_global_batch_that_does_not_divide_is_refused_with_a_fix():
    with pytest.raises(SystemExit, match=r"--global-batch-size 2048 is not a multiple of --micro-batch-size 8 x 3"):
        resolve(parse_args(["--model", "phi-1.5"]), 3)
    with pytest.raises(SystemExit, match=r"x 512 ranks = 4096; --micro-batch-size 4 divides it"):
        resolve(parse_args(["--model", "phi-1.5"]), 512)
    assert resolve(parse_args(["--model", "phi-1.5", "--micro-batch-size", "4"]), 512).grad_accum == 1


def test_token_budget_gives_steps_from_the_actual_global_batch():
    argv = ["--tokens", "1e6", "--seq-len", "256", "--micro-batch-size", "8", "--grad-accum", "2"]
    cfg = resolve(parse_args(argv), 2)
    assert cfg.max_steps == 123  # 1e6 / (8 x 2 x 2 x 256 = 8192) = 122.07, rounded up
    cfg = resolve(parse_args(["--tokens", "8192", "--seq-len", "256", "--micro-batch-size", "8"]), 4)
    assert cfg.max_steps == 1  # exactly one step of 8 x 4 x 256 = 8192 tokens


def test_deepspeed_config_precision_zero3_and_offload():
    cfg = resolve(parse_args(["--model", "phi-1.5"]), 8)
    ds = deepspeed_config(cfg, 8, "fp16")
    assert ds["train_batch_size"] == 2048 and ds["gradient_accumulation_steps"] == 32
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert "bf16" not in ds and "offload_optimizer" not in ds["zero_optimization"]
    assert deepspeed_config(cfg, 8, "bf16")["bf16"] == {"enabled": True}
    assert "fp16" not in deepspeed_config(cfg, 8, "fp32")
    z3 = deepspeed_config(dataclasses.replace(cfg, zero_stage=3), 8, "bf16")
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    off = deepspeed_config(dataclasses.replace(cfg, offload_optimizer="cpu"), 8, "fp16", on_gpu=False)
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert off["zero_force_ds_cpu_optimizer"] is False  # our FusedAdam, not DeepSpeedCPUAdam
    with pytest.raises(ValueError, match="resolved"):
        deepspeed_config(parse_args(["--model", "phi-1.5"]), 8, "fp16")


@pytest.mark.parametrize("argv, message", [
    (["--world-size", "8"], "--world-size 8 is for --dry-run only"),
    (["--offload-optimizer", "cpu", "--zero-stage", "0"], "--offload-optimizer cpu needs --zero-stage 1, 2 or 3"),
    (["--offload-optimizer", "cpu", "--optimizer-backend", "triton"], "--optimizer-backend triton cannot step an "
                                                                       "offloaded optimizer"),
    (["--mfu", "0", "--dry-run"], "--mfu must be in"),
    (["--tokens", "-1"], "--tokens must be a finite number > 0"),
    (["--global-batch-size", "0"], "--global-batch-size must be positive"),
    (["--max-steps", "4", "--warmup-steps", "4"], "--warmup-steps must be in"),
])
def test_bad_values_name_their_flag(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        validate(parse_args(argv + ["--out-dir", str(tmp_path / "out")]), 1)


def test_bad_config_file_and_choices(tmp_path):
    with pytest.raises(SystemExit, match=r"field 'tokens' expected a number, got str .lots. \(or null\)"):
        parse_args(["--config", _write(tmp_path, {"tokens": "lots"})])
    with pytest.raises(SystemExit, match=r"field 'precision' expected one of"):
        parse_args(["--config", _write(tmp_path, {"precision": "fp8"})])
    with pytest.raises(SystemExit, match=r"unknown fields \['lr_max'\]"):
        parse_args(["--config", _write(tmp_path, {"lr_max": 1.0})])
    with pytest.raises(SystemExit) as e:  # argparse: usage and "invalid choice" on stderr, exit status 2
        parse_args(["--precision", "fp8"])
    assert e.value.code == 2


def test_recipe_fields_are_trainconfig_fields():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for model, recipe in RECIPES.items():
        assert set(recipe) <= names, model
