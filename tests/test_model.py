"""phi_model against Hugging Face transformers' PhiForCausalLM (the external oracle): logits,
loss and gradients, both directions of checkpoint IO, document-aware attention, generation."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from phi_model import CheckpointError, PhiConfig, PhiForCausalLM
from phi_model.generate import generate, sample_next
from tests.conftest import subprocess_env

transformers = pytest.importorskip("transformers")

SHAPES = {  # small phi-1.5-shaped (head_dim 64, rotary 32) and phi-2-shaped (head_dim 80, rotary 32)
    "phi-1.5-like": dict(hidden_size=128, num_attention_heads=2, partial_rotary_factor=0.5),
    "phi-2-like": dict(hidden_size=160, num_attention_heads=2, partial_rotary_factor=0.4),
}


def _hf_model(shape: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.PhiConfig(vocab_size=311, intermediate_size=256, num_hidden_layers=2,
                                 max_position_embeddings=128, attn_implementation="eager", **SHAPES[shape])
    return transformers.PhiForCausalLM(cfg).eval()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_hf_checkpoint_loads_with_matching_logits_loss_and_grads(shape, tmp_path):
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path)
    ours = PhiForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert ours.config.head_dim == SHAPES[shape]["hidden_size"] // 2 and ours.config.rotary_dim == 32
    x = torch.randint(0, 311, (2, 41))
    labels = x.clone()
    labels[0, :5] = -100
    out_hf = hf(x, labels=labels)
    out = ours(x, labels=labels)
    assert (out.logits - out_hf.logits).abs().max() < 1e-4
    assert abs(out.loss.item() - out_hf.loss.item()) < 1e-5
    out.loss.backward()
    out_hf.loss.backward()
    ours_grads = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        torch.testing.assert_close(ours_grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_autocast_bf16_matches_hf(tmp_path):
    """Under torch.autocast the projections give bf16 q/k while the embedding stays fp32: the
    rotary tables must follow q's dtype (this raised "cos must have x's dtype" before)."""
    hf = _hf_model("phi-1.5-like")
    hf.save_pretrained(tmp_path)
    ours = PhiForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 311, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_hf = ours(x, labels=x), hf(x, labels=x)
    assert out.logits.dtype == out_hf.logits.dtype == torch.bfloat16
    # bf16 rounds at 2^-8 relative: the two stacks round in different places (fused loss, attention).
    torch.testing.assert_close(out.logits.float(), out_hf.logits.float(), atol=3e-2, rtol=3e-2)
    assert abs(out.loss.item() - out_hf.loss.item()) < 1e-2
    out.loss.backward()
    out_hf.loss.backward()
    ours_grads = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        scale = p.grad.abs().max().item()
        assert (ours_grads[name].grad - p.grad).abs().max().item() <= 0.05 * scale + 1e-6, name


@pytest.mark.parametrize("shape", list(SHAPES))
def test_our_checkpoint_loads_in_hf(shape, tmp_path):
    cfg = PhiConfig(vocab_size=311, intermediate_size=256, num_hidden_layers=2, max_position_embeddings=128,
                    **SHAPES[shape])
    torch.manual_seed(1)
    ours = PhiForCausalLM(cfg).eval()
    ours.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "model.safetensors") and not os.path.exists(tmp_path / "pytorch_model.bin")
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(0, 311, (1, 29))
    assert (hf(x).logits - ours(x).logits).abs().max() < 1e-4


def test_microsoft_format_and_bin(tmp_path):
    hf = _hf_model("phi-1.5-like")
    sd = hf.state_dict()
    ms = {"transformer.embd.wte.weight": sd["model.embed_tokens.weight"],
          "lm_head.ln.weight": sd["model.final_layernorm.weight"], "lm_head.ln.bias": sd["model.final_layernorm.bias"],
          "lm_head.linear.weight": sd["lm_head.weight"], "lm_head.linear.bias": sd["lm_head.bias"]}
    for i in range(2):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            ms[f"transformer.h.{i}.mixer.Wqkv.{kind}"] = torch.cat(
                [sd[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], 0)
            ms[f"transformer.h.{i}.mixer.out_proj.{kind}"] = sd[p + f"self_attn.dense.{kind}"]
            ms[f"transformer.h.{i}.ln.{kind}"] = sd[p + f"input_layernorm.{kind}"]
            for fc in ("fc1", "fc2"):
                ms[f"transformer.h.{i}.mlp.{fc}.{kind}"] = sd[p + f"mlp.{fc}.{kind}"]
    cfg = {"model_type": "phi-msft", "vocab_size": 311, "n_embd": 128, "n_layer": 2, "n_head": 2, "n_inner": 256,
           "rotary_dim": 32, "n_positions": 128, "layer_norm_epsilon": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(ms, tmp_path / "pytorch_model.bin")
    ours = PhiForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 311, (1, 17))
    assert (ours(x).logits - hf(x).logits).abs().max() < 1e-4


def test_bad_checkpoints_name_keys_and_shapes(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        PhiForCausalLM.from_pretrained(str(tmp_path))
    hf = _hf_model("phi-1.5-like")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*mlp.fc1.weight: checkpoint \(256, 128\)"):
        PhiForCausalLM.from_pretrained(str(tmp_path))
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 256, 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing keys .*model.layers.2"):
        PhiForCausalLM.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        PhiForCausalLM.from_pretrained(str(tmp_path))


def test_presets_and_config_errors():
    c = PhiConfig.from_name("phi-1.5")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.rotary_dim) == (2048, 24, 32, 64, 32)
    p2 = PhiConfig.from_name("phi-2")
    assert (p2.head_dim, p2.rotary_dim, p2.resid_pdrop) == (80, 32, 0.1)
    with torch.device("meta"):
        assert PhiForCausalLM(c).num_params() == 1_418_270_720  # the published count
        assert PhiForCausalLM(PhiConfig.from_name("tiny")).num_params() == 7_360_000  # "7.4M" in the docs
    with pytest.raises(ValueError, match="unknown model"):
        PhiConfig.from_name("phi-9")
    with pytest.raises(ValueError, match="divisible"):
        PhiConfig(hidden_size=100, num_attention_heads=3)


def test_document_aware_attention_isolates_documents():
    cfg = dataclasses.replace(PhiConfig.from_name("tiny"), vocab_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = PhiForCausalLM(cfg).eval()
    eos = 0
    doc_a = torch.randint(1, 64, (9,))
    doc_b = torch.randint(1, 64, (7,))
    packed = torch.cat([doc_a, torch.tensor([eos]), doc_b])[None]
    out = model(packed, eos_token_id=eos).logits
    # Document b alone (positions restart at 0) gives the same logits as inside the pack.
    alone = model(doc_b[None]).logits
    torch.testing.assert_close(out[0, 10:], alone[0], atol=1e-4, rtol=0)
    # Without document-awareness, b sees a: different logits.
    assert (model(packed).logits[0, 10:] - alone[0]).abs().max() > 1e-3


def test_training_step_and_checkpointing():
    cfg = dataclasses.replace(PhiConfig.from_name("tiny"), vocab_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = PhiForCausalLM(cfg)
    x = torch.randint(0, 64, (2, 32))
    loss = model(x, labels=x).loss
    loss.backward()
    g = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, labels=x).loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, g)
    assert model.flops_per_token(32) > 6 * (model.num_params() - 64 * 256)


def _tiny_model(layers: int = 2, **kw):
    cfg = dataclasses.replace(PhiConfig.from_name("tiny"), vocab_size=97, num_hidden_layers=layers, **kw)
    torch.manual_seed(0)
    return PhiForCausalLM(cfg).eval()


def test_cached_generation_equals_uncached_greedy():
    model = _tiny_model()
    prompts = [[5, 17, 3, 88], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    batched = generate(model, prompts, 20)  # one batch: right-padded prefill, per-row positions after
    uncached = generate(model, prompts, 20, use_cache=False)  # each prompt alone, whole sequence every step
    assert batched == uncached and all(len(c) == 20 for c in batched)
    assert [generate(model, p, 20)[0] for p in prompts] == uncached  # each prompt alone, cached
    # Stops at EOS; sampling is reproducible from the seed.
    first = batched[0][3]
    assert generate(model, prompts[0], 20, eos_token_id=first)[0] == batched[0][:4]
    s1 = generate(model, prompts[0], 10, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert s1 == generate(model, prompts[0], 10, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    # Each prompt has its own generator: sampled alone or in a batch, the same tokens.
    sampled = generate(model, prompts, 10, temperature=0.9, seed=5)
    assert sampled == [generate(model, p, 10, temperature=0.9, seed=5)[0] for p in prompts]
    assert sampled[0] != generate(model, prompts[0], 10, temperature=0.9, seed=6)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cached_decoding_under_autocast(dtype):
    """Under torch.autocast k and v come out of the projections in the autocast dtype: the caches
    are made in it (generate raised "k and v must have the caches' dtype" before), and a cached
    decoding step gives the logits of the whole sequence run again, to the autocast dtype's
    rounding."""
    model = _tiny_model()
    prompts = [[5, 17, 3, 88], [9, 60]]
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        caches = model.new_caches(2, 8)
        assert all(c.k.dtype == c.v.dtype == dtype for c in caches)
        ids = torch.tensor([prompts[0], prompts[1] + [0, 0]])
        model(ids, caches=caches, cache_pos=0)  # prefill, right-padded
        nxt = torch.tensor([[7], [11]])
        pos = torch.tensor([4, 2], dtype=torch.int32)
        step = model(nxt, caches=caches, cache_pos=pos).logits[:, -1].float()
        for i, p in enumerate(prompts):
            full = model(torch.tensor([p + [int(nxt[i])]])).logits[0, -1].float()
            torch.testing.assert_close(step[i], full, atol=0.05 * full.abs().max().item(), rtol=0.05)
        out = generate(model, prompts, 6)
    assert [len(o) for o in out] == [6, 6]


def test_batched_generation_stops_each_row_at_its_own_eos():
    model = _tiny_model()
    prompts = [[5, 17, 3, 88, 40, 41], [9, 60], [1, 2, 3]]
    full = generate(model, prompts, 16)
    eos = full[1][2]  # row 1 stops at its third token; the others at their first eos, if any
    seen = []
    out = generate(model, prompts, 16, eos_token_id=eos, on_token=lambda i, t: seen.append((i, t)))
    for row, ref in zip(out, full):
        assert row == (ref[:ref.index(eos) + 1] if eos in ref else ref)
    assert out == [generate(model, p, 16, eos_token_id=eos)[0] for p in prompts]
    assert sorted(seen) == sorted((i, t) for i, row in enumerate(out) for t in row)


def test_per_row_cache_positions_equal_separate_forwards():
    """model(..., cache_pos=<int32 (B,)>) == running each row alone at its own position."""
    model = _tiny_model(num_key_value_heads=1)  # GQA through the cache too
    lens = [3, 7, 0]
    prefix = torch.randint(0, 97, (3, 7))
    step = torch.randint(0, 97, (3, 2))
    with torch.no_grad():
        caches = model.new_caches(3, 12)
        model(prefix, caches=caches, cache_pos=0)  # rows overwrite their tail beyond lens[b] below
        pos = torch.tensor(lens, dtype=torch.int32)
        batched = model(step, caches=caches, cache_pos=pos).logits
        for b, n in enumerate(lens):
            alone = model(torch.cat([prefix[b:b + 1, :n], step[b:b + 1]], 1)).logits[:, n:]
            torch.testing.assert_close(batched[b:b + 1], alone, atol=1e-5, rtol=1e-5)


def test_logits_at_equals_full_logits_at_those_positions():
    """logits_at (what generate's prefill asks for) gives the full forward's logits at each row's
    position, with and without caches; bad values are refused by name before any compute."""
    model = _tiny_model()
    x = torch.randint(0, 97, (3, 9))
    at = torch.tensor([8, 0, 4])
    with torch.no_grad():
        full = model(x).logits
        picked = model(x, logits_at=at).logits
        cached = model(x, caches=model.new_caches(3, 9), cache_pos=0, logits_at=at.int()).logits
    assert picked.shape == (3, 1, full.shape[-1])
    want = full[torch.arange(3), at].unsqueeze(1)
    torch.testing.assert_close(picked, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, want, atol=1e-5, rtol=1e-5)
    for bad, match in ((torch.tensor([9, 0, 0]), r"\[0, seqlen=9\)"), (torch.tensor([-1, 0, 0]), r"\[0, seqlen=9\)"),
                       (torch.tensor([1, 2]), r"shape \(batch,\) = \(3,\)"),
                       (torch.tensor([1.0, 2.0, 3.0]), "int64 or int32"), ([1, 2, 3], "got list")):
        with pytest.raises(ValueError, match=match):
            model(x, logits_at=bad)
    with pytest.raises(ValueError, match="with labels"):
        model(x, labels=x, logits_at=at)


def test_generation_and_cache_bad_input():
    model = _tiny_model(layers=1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], -1)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], 4)
    caches = model.new_caches(2, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="int32 tensor of shape"):
        model(torch.zeros(2, 1, dtype=torch.long), caches=caches, cache_pos=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="needs caches"):
        model(torch.zeros(2, 1, dtype=torch.long), cache_pos=torch.tensor([1, 2], dtype=torch.int32))
    with torch.no_grad(), pytest.raises(ValueError, match="cache_len = 8"):
        model(torch.zeros(2, 2, dtype=torch.long), caches=caches, cache_pos=torch.tensor([1, 7], dtype=torch.int32))


def test_model_trains_under_torch_compile():
    """fullgraph torch.compile (aot_eager: the custom ops' fake and autograd registrations) gives
    the eager loss and gradients, with logits and with the fused loss."""
    model = _tiny_model().train()
    x = torch.randint(0, 97, (2, 24))
    for return_logits in (True, False):
        loss = model(x, labels=x, return_logits=return_logits).loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        closs = compiled(x, labels=x, return_logits=return_logits).loss
        cgrads = torch.autograd.grad(closs, list(model.parameters()))
        torch.testing.assert_close(closs, loss)
        for g, cg in zip(grads, cgrads):
            torch.testing.assert_close(cg, g, atol=1e-6, rtol=1e-5)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])
    assert sample_next(logits, 0.0, None, None, None).item() == 2
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 2, None, g).item() for _ in range(50)}
    assert picks <= {2, 3}
    picks = {sample_next(logits, 1.0, None, 0.5, g).item() for _ in range(50)}
    assert picks == {2}


def test_generate_command_streams_from_a_checkpoint_dir(tmp_path):
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = dataclasses.replace(PhiConfig.from_name("tiny"), vocab_size=tok.get_vocab_size(), num_hidden_layers=1,
                              eos_token_id=tok.token_to_id("<|endoftext|>"))
    PhiForCausalLM(cfg).save_pretrained(str(tmp_path))
    tok.save(str(tmp_path / "tokenizer.json"))
    out = subprocess.run([sys.executable, "-m", "phi_model.generate", "--checkpoint", str(tmp_path), "--prompt",
                          "def add(", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=120,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def add(") and len(out.stdout) > len("def add(\n")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_linear_cross_entropy_matches_unfused(dtype):
    """Chunked, logits-free loss = F.cross_entropy(F.linear(...)) in value and gradients, with
    ignored rows, a ragged last chunk, and a non-unit incoming gradient; no grads in no_grad."""
    import torch.nn.functional as F

    from phi_model.loss import fused_linear_cross_entropy

    h = torch.randn(300, 64, dtype=dtype, requires_grad=True)
    w = torch.randn(1000, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(1000, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    t[::7] = -100
    expect = F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100)
    g_expect = torch.autograd.grad(expect * 3, (h, w, b))
    got = fused_linear_cross_entropy(h, w, b, t, chunk_rows=128)
    g_got = torch.autograd.grad(got * 3, (h, w, b))
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    for a, e in zip(g_got, g_expect):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, b, t), expect.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="targets must be int64"):
        fused_linear_cross_entropy(h, w, b, t.int())


def test_model_fused_loss_equals_logits_loss():
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig.from_name("tiny"))
    x = torch.randint(0, model.config.vocab_size, (2, 40))
    labels = x.clone()
    labels[:, :5] = -100
    ref = model(x, labels=labels)
    g_ref = torch.autograd.grad(ref.loss, list(model.parameters()))
    fused = model(x, labels=labels, return_logits=False)
    assert fused.logits is None
    g_fused = torch.autograd.grad(fused.loss, list(model.parameters()))
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(g_fused, g_ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
