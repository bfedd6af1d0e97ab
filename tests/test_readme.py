"""Every Python example in README.md runs, so the README cannot go stale.

Each ```python block is executed in a fresh namespace, in a temporary working directory, after
the set-up its marker names: `<!-- readme-test: setup=NAME -->` on the line before the block
(SETUPS below make the tensors and files the example assumes, at toy sizes), or
`<!-- readme-test: skip: REASON -->` for an example that cannot run here (say why). A block
written as a doctest (`>>>` lines) runs its statements; its printed output is machine-specific
and not compared. Shell commands are not run here: the main job and the CLIs have their own
tests (tests/test_train.py, tests/test_bad_input_io.py).
"""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^\n]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)

SETUPS = {
    "rotary": """
import torch
torch.manual_seed(0)
seqlen, cache_len, m = 32, 4, 6
q = torch.randn(2, 8, 4, 64)
x = torch.randn(10, 4, 64)
cu = torch.tensor([0, 4, 10], dtype=torch.int32)
qkv = torch.randn(2, 8, 3, 4, 64)
""",
    "flash": """
import torch
torch.manual_seed(0)
q, k, v = torch.randn(2, 16, 4, 64), torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
q_p, k_p, v_p = torch.randn(10, 4, 64), torch.randn(12, 2, 64), torch.randn(12, 2, 64)
cu_seqlens_q = torch.tensor([0, 4, 10], dtype=torch.int32)
cu_seqlens_k = torch.tensor([0, 5, 12], dtype=torch.int32)
max_seqlen_q, max_seqlen_k = 6, 7
k_cache, v_cache = torch.zeros(2, 64, 2, 64), torch.zeros(2, 64, 2, 64)
k_new, v_new = torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
lens = torch.tensor([3, 9], dtype=torch.int32)
""",
    "adam": """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(16, 8)
params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
for p in [*model.parameters(), *params]:
    p.grad = torch.randn_like(p)
scaler = torch.amp.GradScaler("cpu")
scaler.scale(torch.ones((), requires_grad=True))  # the scaler's state, as after scaler.scale(loss)
""",
    "linear": """
import torch
import phi_kernels
torch.manual_seed(0)
layer, x = torch.nn.Linear(64, 32), torch.randn(1, 64)
""",
    "phi_model": """
import torch
from phi_model import PhiConfig, PhiForCausalLM as _Phi
torch.manual_seed(0)
_Phi(PhiConfig.from_name("tiny")).save_pretrained("path/to/phi-1_5")
input_ids = torch.randint(0, 8192, (2, 12))
prompt_ids = torch.randint(0, 8192, (5,))
ids_a, ids_b, ids_c = [5, 6, 7], [8, 9], [10, 11, 12, 13]
""",
    # A tiny transformers Phi saved where the example's Hub name points: from_pretrained then
    # reads the local folder (no network).
    "hf_hub_dir": """
import torch, transformers
torch.manual_seed(0)
_cfg = transformers.PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64)
transformers.PhiForCausalLM(_cfg).save_pretrained("microsoft/phi-1_5")
""",
    "hf_models": """
import torch, transformers
torch.manual_seed(0)
phi = transformers.PhiForCausalLM(transformers.PhiConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2))
""",
    "hf_trainer": """
import torch, transformers
from transformers import Trainer, TrainingArguments
torch.manual_seed(0)
model = transformers.PhiForCausalLM(transformers.PhiConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
args = TrainingArguments(output_dir="trainer_out", max_steps=2, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, learning_rate=1e-3)
_ids = torch.randint(0, 128, (4, 8))
ds = [{"input_ids": r, "labels": r} for r in _ids]
""",
    "phi_generate": """
import torch
from phi_model import PhiConfig, PhiForCausalLM
torch.manual_seed(0)
model = PhiForCausalLM(PhiConfig.from_name("tiny"))
input_ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])      # left padding
""",
}


def _revert_class_patches() -> None:
    """An example that patches transformers' classes must not leak the patch into other tests."""
    import sys

    integration = sys.modules.get("phi_kernels.integrations.transformers")
    if integration is not None:
        integration.revert_phi_kernels_patches()


def _blocks() -> list:
    with open(README) as f:
        text = f.read()
    params = []
    for i, m in enumerate(_BLOCK.finditer(text)):
        line = text.count("\n", 0, m.start("code"))
        mark = (m.group("mark") or "").strip()
        marks = ()
        if mark.startswith("skip:"):
            marks = (pytest.mark.skip(reason=f"README line {line}: {mark[5:].strip()}"),)
        params.append(pytest.param(mark, m.group("code"), id=f"line{line}", marks=marks))
    return params


def _statements(code: str) -> str:
    """A doctest-style block's statements (`>>>` / `...` lines); other blocks unchanged."""
    lines = code.splitlines()
    if not any(ln.startswith(">>> ") for ln in lines):
        return code
    return "\n".join(ln[4:] for ln in lines if ln.startswith((">>> ", "... ")))


def test_readme_has_python_examples():
    assert len(_blocks()) >= 5


@pytest.mark.parametrize("mark,code", _blocks())
def test_readme_example_runs(mark, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    if mark:
        key, _, name = mark.partition("=")
        assert key == "setup" and name in SETUPS, f"unknown README marker {mark!r}"
        exec(compile(SETUPS[name], f"<setup {name}>", "exec"), namespace)
    try:
        exec(compile(_statements(code), "<README example>", "exec"), namespace)
    finally:
        _revert_class_patches()
