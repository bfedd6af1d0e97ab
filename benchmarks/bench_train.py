"""Training throughput of the tiny phi config on this machine: train/pretrain.py (DeepSpeed
ZeRO-2 + phi_kernels FusedAdam + phi_model) against plain torch DDP + torch AdamW (fused), like
for like: the same model, seed, data, micro-batch, optimizer settings and 2 processes (torchrun,
gloo on CPU), and the same loss on both sides, measured twice: with the fused lm_head + cross
entropy (phi_model/loss.py) on both, and with the unfused one (logits + F.cross_entropy) on both.
Each loss kind is one benchmark group (one row each side). Tokens/s are the median of per-step
times after warm-up, measured inside each run; extra_info also records each side's first-step
loss, equal on both sides when the comparison is like for like.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import pytest
import torch

from benchmarks.harness import bench, quick_mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12 if quick_mode() else 40
MICRO, SEQ = 8, 256


@pytest.fixture(scope="module")
def data_dir():
    d = os.path.join(ROOT, "data", "stdlib")
    if not os.path.exists(os.path.join(d, "meta.json")):
        from phi_train.prepare_data import prepare

        prepare(d)
    return d


def _torchrun(script_args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                         + script_args, capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def _record(benchmark, provider, ours, tokens_per_s, loss_kind, first_loss):
    # The run measured itself; pytest-benchmark times a no-op so the result lands in the JSON.
    bench(benchmark, lambda: None,
          group=f"train tiny 2 procs b{MICRO} s{SEQ} fp32, {loss_kind} loss both sides (tokens/s measured in-run)",
          provider=provider, ours=ours, work=1.0, unit="tokens/s", shape=f"micro {MICRO} x seq {SEQ} x 2", dtype="fp32",
          device="cpu" if not torch.cuda.is_available() else "cuda", rounds=3, warmup=1)
    benchmark.extra_info["throughput"] = tokens_per_s  # the in-run figure, not the no-op's
    benchmark.extra_info["first_loss"] = first_loss


@pytest.mark.parametrize("loss_kind", ["fused", "unfused"])
def test_pretrain_zero2_fused_adam(benchmark, data_dir, loss_kind):
    with tempfile.TemporaryDirectory() as out:
        _torchrun([os.path.join(ROOT, "train", "pretrain.py"), "--data", data_dir, "--out-dir", out, "--max-steps",
                   str(STEPS), "--log-interval", "1", "--eval-interval", str(10**6), "--save-interval", str(10**6),
                   "--micro-batch-size", str(MICRO), "--seq-len", str(SEQ), "--grad-accum", "1",
                   "--fused-loss", "true" if loss_kind == "fused" else "false"])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
    tput = statistics.median(r["tokens_per_s"] for r in recs[2:-1])
    _record(benchmark, "pretrain.py: ZeRO-2 + FusedAdam", True, tput, loss_kind, recs[0]["loss"])


@pytest.mark.parametrize("loss_kind", ["fused", "unfused"])
def test_ddp_torch_adamw(benchmark, data_dir, loss_kind):
    out = _torchrun([os.path.join(ROOT, "benchmarks", "ddp_baseline.py"), data_dir, str(STEPS), str(MICRO), str(SEQ),
                     loss_kind])
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[7:])
    _record(benchmark, "torch DDP + AdamW (fused)", False, res["tokens_per_s"], loss_kind, res["first_loss"])
