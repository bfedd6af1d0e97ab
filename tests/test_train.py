"""train/: data preparation round trip, the loader, bad configurations, and 2-process torchrun
runs with DeepSpeed ZeRO-2 on CPU (loss falls, checkpoints are atomic, resume is exact)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from phi_train.config import TrainConfig, deepspeed_config, parse_args, validate
from phi_train.data import TokenLoader, read_shard, write_shard
from phi_train.prepare_data import prepare

TEXTS = [f"def f{i}(x):\n    \"\"\"Return x times {i}.\"\"\"\n    return x * {i}\n" for i in range(400)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "src.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    prepare(str(d / "shards"), [str(src)], field="text", vocab_size=400, val_every=10)
    return str(d / "shards")


def test_prepare_round_trip(data_dir):
    from tokenizers import Tokenizer

    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    tok = Tokenizer.from_file(os.path.join(data_dir, "tokenizer.json"))
    train = np.asarray(read_shard(os.path.join(data_dir, "train_000.bin")))
    assert train.dtype == np.uint16 and meta["train_tokens"] == len(train)
    docs = np.split(train, np.where(train == meta["eos_token_id"])[0] + 1)[:-1]
    expected = [t for i, t in enumerate(TEXTS) if i % 10 != 9]
    assert len(docs) == len(expected)
    assert tok.decode(docs[3][:-1].tolist()) == expected[3]
    assert tok.decode(docs[-1][:-1].tolist()) == expected[-1]
    val = np.asarray(read_shard(os.path.join(data_dir, "val_000.bin")))
    assert tok.decode(val[:list(val).index(meta["eos_token_id"])].tolist()) == TEXTS[9]


def test_shard_format_rejects_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a shard" * 10)
    with pytest.raises(ValueError, match="not a phi-kernels token shard"):
        read_shard(str(tmp_path / "x.bin"))
    write_shard(str(tmp_path / "big.bin"), np.array([1, 70000]))
    assert read_shard(str(tmp_path / "big.bin")).dtype == np.uint32


def test_loader_distinct_deterministic_resumable(data_dir):
    a0, a1 = (TokenLoader(data_dir, "train", 16, 2, rank=r, world=2, seed=5) for r in (0, 1))
    seen0 = {tuple(row.tolist()) for _ in range(5) for row in a0.next_batch()}
    seen1 = {tuple(row.tolist()) for _ in range(5) for row in a1.next_batch()}
    assert not seen0 & seen1, "ranks must see distinct windows"
    b = TokenLoader(data_dir, "train", 16, 2, rank=0, world=2, seed=5)
    for _ in range(3):
        b.next_batch()
    state = b.state_dict()
    expect = [b.next_batch() for _ in range(4)]
    c = TokenLoader(data_dir, "train", 16, 2, rank=0, world=2, seed=5)
    c.load_state_dict(state)
    assert all((c.next_batch() == e).all() for e in expect)


def test_bad_configuration_fails_before_any_process_group(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="not a preset"):
        validate(TrainConfig(model="phi-9", data=data_dir), 2)
    with pytest.raises(SystemExit, match="no prepared shards"):
        validate(TrainConfig(data=str(tmp_path / "missing")), 2)
    with pytest.raises(SystemExit, match="fewer than"):
        validate(TrainConfig(data=data_dir, seq_len=4096), 64)
    with pytest.raises(SystemExit, match="--zero-stage"):
        validate(TrainConfig(data=data_dir, zero_stage=5), 1)
    cfg = parse_args(["--micro-batch-size", "3", "--grad-accum", "5", "--data", data_dir])
    assert deepspeed_config(cfg, 4, "fp32")["train_batch_size"] == 60
    assert parse_args(["--model", "phi-1.5"]).lr == 2e-4  # the paper's recipe for the real model
    # The script itself: a bad flag value exits non-zero with the message, without starting DeepSpeed.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train", "pretrain.py"), "--model", "nope", "--data",
                          data_dir], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "not a preset" in out.stderr


def _torchrun(args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train", "pretrain.py")] + args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_zero2_run_resume_is_exact_and_checkpoints_atomic(data_dir, tmp_path):
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"vocab_size": 400, "hidden_size": 128, "intermediate_size": 256,
                                 "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 128}))
    common = ["--model", str(model), "--data", data_dir, "--seq-len", "64", "--micro-batch-size", "4", "--lr", "3e-3",
              "--log-interval", "1", "--eval-interval", "100", "--eval-batches", "2", "--save-interval", "4",
              "--keep-last", "2"]
    straight = str(tmp_path / "straight")
    _torchrun(common + ["--out-dir", straight, "--max-steps", "12"])
    losses = _losses(straight)
    assert losses[12] < losses[1] - 0.5, f"loss did not fall: {losses}"
    ckpts = sorted(d for d in os.listdir(os.path.join(straight, "checkpoints")) if d.startswith("step_"))
    assert ckpts == ["step_000008", "step_000012"], "keeps the last 2"
    assert os.path.exists(os.path.join(straight, "final", "model.safetensors"))
    assert os.path.exists(os.path.join(straight, "final", "tokenizer.json"))
    assert os.path.exists(os.path.join(straight, "loss.png"))

    resumed = str(tmp_path / "resumed")
    _torchrun(common + ["--out-dir", resumed, "--max-steps", "8"])
    # Simulate a crash in the middle of saving step 12: its directory exists, half written,
    # without COMPLETE, and `latest` was never moved. Resume must use step 8.
    crashed = os.path.join(resumed, "checkpoints", "step_000012")
    os.makedirs(crashed)
    open(os.path.join(crashed, "mp_rank_00_model_states.pt"), "wb").write(b"truncated")
    assert open(os.path.join(resumed, "checkpoints", "latest")).read() == "step_000008"
    out = _torchrun(common + ["--out-dir", resumed, "--max-steps", "12", "--resume"])
    assert "resumed from step_000008 at step 8" in out.stdout
    again = _losses(resumed)
    for s in range(9, 13):
        assert abs(again[s] - losses[s]) <= 1e-6 * abs(losses[s]), (s, again[s], losses[s])


@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory):
    """run(name, *flags): a 3-step 2-process run of a small model; returns (out dir, losses by step)."""
    tmp = tmp_path_factory.mktemp("short")
    model = tmp / "model.json"
    model.write_text(json.dumps({"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64}))
    runs = {}

    def run(name, *flags):
        if name not in runs:
            out = str(tmp / name)
            _torchrun(["--model", str(model), "--data", data_dir, "--seq-len", "32", "--micro-batch-size", "2",
                       "--grad-accum", "2", "--lr", "3e-3", "--max-steps", "3", "--log-interval", "1",
                       "--eval-interval", "3", "--eval-batches", "1", "--save-interval", "100", "--out-dir", out,
                       *flags])
            runs[name] = out, _losses(out)
        return runs[name]

    return run


def _close(a: dict, b: dict, rel: float) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rel * abs(b[k]) for k in a)


@pytest.mark.slow
def test_zero3_fused_loss_equals_zero2_and_exports(short_run):
    from safetensors.torch import load_file

    z2_dir, z2 = short_run("zero2")
    z3_dir, z3 = short_run("zero3", "--zero-stage", "3")
    # lm_head's parameters, read by the fused loss outside lm_head's forward, are gathered under
    # ZeRO-3 (registered as external parameters): the same losses, step by step.
    assert len(z2) == 3 and _close(z3, z2, 1e-5), (z3, z2)
    w2 = load_file(os.path.join(z2_dir, "final", "model.safetensors"))
    w3 = load_file(os.path.join(z3_dir, "final", "model.safetensors"))
    assert w2.keys() == w3.keys()
    for k in w2:  # the export gathered every partition: full shapes, the same trained values
        assert w3[k].shape == w2[k].shape and (w3[k] - w2[k]).abs().max() <= 1e-5, k


@pytest.mark.slow
def test_offloaded_fused_adam_equals_the_device_optimizer(short_run):
    _, z2 = short_run("zero2")
    out_dir, off = short_run("offload", "--offload-optimizer", "cpu")
    # DeepSpeed's ZeRO-Offload path (host fp32 partitions, stepped by FusedAdam's CPU kernel; the run
    # exits if DeepSpeed did not enable it) gives the losses of the non-offloaded run.
    assert _close(off, z2, 1e-5), (off, z2)
    with open(os.path.join(out_dir, "deepspeed_config.json")) as f:
        assert json.load(f)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with open(os.path.join(out_dir, "train_config.json")) as f:
        saved = json.load(f)
    assert saved["offload_optimizer"] == "cpu" and saved["world_size"] == 2 and saved["grad_accum"] == 2
