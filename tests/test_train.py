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
sys.path.insert(0, ROOT)
from train.config import TrainConfig, deepspeed_config, parse_args, validate  # noqa: E402
from train.data import TokenLoader, read_shard, write_shard  # noqa: E402
from train.prepare_data import prepare  # noqa: E402

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
