"""FusedAdam as DeepSpeed ZeRO-2's client optimizer: a 2-process torchrun run on CPU (gloo)
gives the same losses as the same run with torch.optim.AdamW."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(which: str) -> list[float]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "deepspeed_adam_worker.py"), which]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("LOSSES ")]
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(line[-1][len("LOSSES "):])


@pytest.mark.slow
def test_zero2_fused_adam_matches_torch_adamw():
    fused = _run("fused")
    torch_adamw = _run("torch")
    assert len(fused) == 8
    assert fused[-1] < fused[0], f"loss did not fall: {fused}"
    for a, b in zip(fused, torch_adamw):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (fused, torch_adamw)
