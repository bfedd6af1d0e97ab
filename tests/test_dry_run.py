"""train/dry_run.py (`pretrain.py --dry-run`): the plan of phi-1.5 on 8, 64 and 128 GPUs, every
figure checked against values computed here by hand from the architecture (not from the model),
and the script run with a --config file on this CPU."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from phi_train.config import parse_args, validate
from phi_train.dry_run import GiB, plan, render
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# phi-1.5: vocab V, width C, MLP F, L layers, seq T.
V, C, F, L, T = 51200, 2048, 8192, 24, 2048
PER_LAYER = 2 * C + 4 * (C * C + C) + (C * F + F) + (F * C + C)  # LayerNorm, q k v dense, fc1, fc2 (with biases)
N = V * C + L * PER_LAYER + 2 * C + (V * C + V)  # embedding, layers, final LayerNorm, lm_head
FLOPS_PER_TOKEN = 6 * (N - V * C) + 6 * L * T * C


def _plan(world: int, *extra: str) -> dict:
    return plan(validate(parse_args(["--model", "phi-1.5", "--dry-run", "--world-size", str(world), *extra]), 1))


@pytest.mark.parametrize("world, accum", [(8, 32), (64, 4), (128, 2)])
def test_phi15_plan_matches_hand_computed_figures(world, accum):
    p = _plan(world)
    assert N == 1_418_270_720 and p["params"] == N
    assert p["embedding_params"] == V * C and p["lm_head_params"] == V * C + V
    assert p["largest_layer_params"] == V * C + V  # lm_head: weight and bias
    assert p["config"]["grad_accum"] == accum and p["global_batch"] == 2048
    assert p["tokens_per_step"] == 2048 * 2048 == 4_194_304
    assert p["max_steps"] == 35_763  # ceil(150e9 / 4194304 = 35762.7)
    assert p["flops_per_token"] == FLOPS_PER_TOKEN
    assert p["precision"] == "fp16" and p["deepspeed"]["fp16"]["enabled"]
    # Model states, bytes per GPU: 2N params, 2N grads, 12N optimizer (fp32 master, m, v) for fp16.
    want = {0: (2 * N, 2 * N, 12 * N), 1: (2 * N, 2 * N, 12 * N / world), 2: (2 * N, 2 * N / world, 12 * N / world),
            3: (2 * N / world, 2 * N / world, 12 * N / world)}
    for s in p["stages"]:
        assert (s.params, s.grads, s.optimizer) == pytest.approx(want[s.stage], rel=1e-12), s.stage
        assert s.host_optimizer == 0
    # DeepSpeed's estimators: 2N + 18N/W (stage 2), 4 x largest layer + 18N/W (stage 3).
    ds = {s.stage: s.deepspeed_gpu for s in p["stages"]}
    assert ds[0] is None and ds[1] is None
    assert ds[2] == 2 * N + int(18 * N / world)
    assert ds[3] == 4 * (V * C + V) + int(18 * N / world)
    # Wall time: FLOPs / (GPUs x peak x MFU 0.4).
    for gpu, peak in (("A100", 312e12), ("H100", 989e12)):
        seconds = FLOPS_PER_TOKEN * 35_763 * 4_194_304 / (world * peak * 0.4)
        assert p["wall_seconds"][gpu] == pytest.approx(seconds, rel=1e-12)
    if world == 8:  # the figures the README quotes
        assert p["wall_seconds"]["H100"] / 3600 == pytest.approx(111.7, abs=0.05)
        assert ds[2] / GiB == pytest.approx(5.61, abs=0.005)


def test_offload_moves_the_optimizer_states_to_the_host():
    p = _plan(8, "--offload-optimizer", "cpu")
    by_stage = {s.stage: s for s in p["stages"]}
    assert by_stage[0].optimizer == 12 * N and by_stage[0].host_optimizer == 0  # no offload without ZeRO
    assert by_stage[2].optimizer == 0 and by_stage[2].host_optimizer == pytest.approx(12 * N / 8)
    assert by_stage[2].deepspeed_gpu == 2 * N  # DeepSpeed's offload estimate: the 16-bit parameters only
    assert "host" in render(p)


def test_plan_builds_the_model_on_meta_only():
    from phi_train.dry_run import build_meta_model

    cfg = validate(parse_args(["--model", "phi-1.5", "--dry-run"]), 1)
    assert all(t.device.type == "meta" for t in build_meta_model(cfg).parameters())
    assert plan(cfg)["config"]["grad_accum"] == 256  # one GPU still steps 2048 sequences


def test_dry_run_script_with_a_config_file(tmp_path):
    out_dir = tmp_path / "never-written"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "phi-1.5", "out_dir": str(out_dir)}))
    env = subprocess_env(PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train", "pretrain.py"), "--dry-run", "--config", str(cfg),
                          "--world-size", "128"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "AdamW lr 0.0002 (constant, warmup 0), betas (0.9, 0.98), eps 1e-07" in text
    assert "seq 2048" in text and "fp16, ZeRO-2" in text
    assert "8 micro x 2 accum x 128 GPUs = 2048 sequences of 2048 tokens" in text
    assert f"steps             {math.ceil(150e9 / (2048 * 2048)):,} " in text
    assert '"loss_scale": 0' in text  # the DeepSpeed JSON: fp16 with dynamic loss scaling
    assert not out_dir.exists(), "a dry run writes nothing"
