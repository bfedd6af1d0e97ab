"""phi_model vs transformers.PhiForCausalLM (sdpa attention), same config, weights and batch.

Training step: forward + backward of a language-model loss, in tokens/s (ours as the training
script runs it: the loss fused with lm_head, return_logits=False; theirs as HF's Trainer does).
Decoding: greedy generation with a KV cache from a short prompt, in generated tokens/s (ours: phi_model.generate;
theirs: model.generate). CPU: fp32, a tiny phi config; GPU: bf16, a phi-1.5-shaped 6-layer slice.
"""
from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from benchmarks.harness import bench, quick_mode
from phi_model import PhiConfig, PhiForCausalLM
from phi_model.generate import generate

transformers = pytest.importorskip("transformers")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
if DEVICE == "cuda":
    CFG = dataclasses.replace(PhiConfig.from_name("phi-1.5"), num_hidden_layers=6)
    BATCH, SEQ, PROMPT, NEW = 8, 2048, 128, 128
else:
    CFG = PhiConfig.from_name("tiny")
    BATCH, SEQ, PROMPT, NEW = 4, 128 if quick_mode() else 256, 16, 16 if quick_mode() else 48


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = PhiForCausalLM(CFG)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.PhiForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    return ours.to(DEVICE, DTYPE), theirs.to(DEVICE, DTYPE)


def _shape():
    return f"{CFG.num_hidden_layers}L h{CFG.hidden_size} b{BATCH} s{SEQ}"


@pytest.mark.parametrize("impl", ["phi_model", "transformers"])
def test_train_step(benchmark, models, impl):
    model = models[0] if impl == "phi_model" else models[1]
    model.train()
    x = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), device=DEVICE)

    def step():
        loss = (model(x, labels=x, return_logits=False) if impl == "phi_model" else model(x, labels=x)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    bench(benchmark, step, group=f"train step (fwd+bwd) {_shape()} {str(DTYPE)[6:]}", provider=impl,
          ours=impl == "phi_model", work=BATCH * SEQ, unit="tokens/s", shape=_shape(), dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("impl", ["phi_model", "transformers"])
def test_cached_decoding(benchmark, models, impl):
    model = (models[0] if impl == "phi_model" else models[1]).eval()
    prompt = torch.randint(0, CFG.vocab_size, (1, PROMPT), device=DEVICE)

    if impl == "phi_model":
        def run():
            return generate(model, prompt[0].tolist(), NEW)
    else:
        def run():
            with torch.no_grad():
                return model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                      use_cache=True, pad_token_id=0)

    bench(benchmark, run, group=f"greedy decoding prompt {PROMPT} + {NEW} new {CFG.num_hidden_layers}L "
                                f"h{CFG.hidden_size} {str(DTYPE)[6:]}",
          provider=impl, ours=impl == "phi_model", work=NEW, unit="tokens/s", shape=f"prompt {PROMPT}, new {NEW}",
          dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("impl", ["phi_model", "transformers"])
def test_batched_decoding_different_lengths(benchmark, models, impl):
    """BATCH prompts of different lengths decoded together. Ours: right-padded prefill, then
    per-row cache positions (flash_attn_with_kvcache); theirs: left padding + attention_mask, the
    way transformers batches prompts."""
    model = (models[0] if impl == "phi_model" else models[1]).eval()
    g = torch.Generator().manual_seed(0)
    lens = [PROMPT // (i + 1) for i in range(BATCH)]
    prompts = [torch.randint(1, CFG.vocab_size, (n,), generator=g).tolist() for n in lens]

    if impl == "phi_model":
        def run():
            return generate(model, prompts, NEW)
    else:
        ids = torch.zeros(BATCH, max(lens), dtype=torch.long)
        mask = torch.zeros(BATCH, max(lens), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, max(lens) - len(p):] = torch.tensor(p)
            mask[i, max(lens) - len(p):] = 1
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)

        def run():
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    bench(benchmark, run, group=f"batched greedy decoding {BATCH} prompts of {min(lens)}..{max(lens)} + {NEW} new "
                                f"{CFG.num_hidden_layers}L h{CFG.hidden_size} {str(DTYPE)[6:]}",
          provider=impl, ours=impl == "phi_model", work=BATCH * NEW, unit="tokens/s",
          shape=f"{BATCH} prompts {min(lens)}..{max(lens)}, new {NEW}", dtype=DTYPE, device=DEVICE)
