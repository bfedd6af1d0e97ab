"""phi_kernels inside transformers: patched Phi / Llama / Mistral / Qwen2 against the unpatched
models (logits, loss, every gradient; fp32 on the CPU, where the cpu attention backend is chosen),
padded batches against each row alone, packed sequences, KV-cache generation, from_pretrained
with attn_implementation="phi_kernels", class patches and their revert, refusals, and 20 Trainer
steps with FusedAdam against the unpatched run with torch's AdamW."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import chunked_causal_mask_function  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from phi_kernels import FusedAdam  # noqa: E402
from phi_kernels.integrations import transformers as pk  # noqa: E402
from phi_kernels.integrations._hf_attention import check_mask_function  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, attention_dropout=0.0)


def _phi(head_dim):  # head_dim 64: rotary 32 (phi-1.5's); 80: rotary 32 of 80 (phi-2's)
    return PhiForCausalLM, PhiConfig(hidden_size=2 * head_dim, intermediate_size=256, num_attention_heads=2,
                                     num_key_value_heads=1, partial_rotary_factor=0.5 if head_dim == 64 else 0.4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, **COMMON), pk.apply_phi_kernels_to_phi


def _llama(head_dim):
    return LlamaForCausalLM, LlamaConfig(hidden_size=4 * head_dim, intermediate_size=192, num_attention_heads=4,
                                         num_key_value_heads=2, **COMMON), pk.apply_phi_kernels_to_llama


def _mistral():  # a sliding window shorter than the sequences
    return MistralForCausalLM, MistralConfig(hidden_size=128, intermediate_size=192, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=64, sliding_window=5,
                                             **COMMON), pk.apply_phi_kernels_to_llama


def _qwen2():  # biased q / k / v
    return Qwen2ForCausalLM, Qwen2Config(hidden_size=128, intermediate_size=192, num_attention_heads=2,
                                         num_key_value_heads=1, **COMMON), pk.apply_phi_kernels_to_llama


ARCHS = {"phi-hd64": lambda: _phi(64), "phi-hd80": lambda: _phi(80), "llama-hd64": lambda: _llama(64),
         "llama-hd80": lambda: _llama(80), "mistral-swa": _mistral, "qwen2": _qwen2}


@pytest.fixture(autouse=True)
def _revert():
    yield
    pk.revert_phi_kernels_patches()


def _pair(arch: str, seed: int = 0):
    """(unpatched model, patched copy, apply function)."""
    cls, cfg, apply = ARCHS[arch]()
    torch.manual_seed(seed)
    base = cls(cfg)
    patched = copy.deepcopy(base)
    return base, patched, apply


def _left_pad_positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


# ----------------------------------------------------------------------------- patched == unpatched


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patched_logits_loss_and_every_gradient_match(arch):
    base, patched, apply = _pair(arch)
    x = torch.randint(0, VOCAB, (2, 13))
    labels = x.clone()
    labels[0, :3] = -100
    base.eval()
    logits = base(x).logits
    base.train()
    loss = base(x, labels=labels).loss
    grads = torch.autograd.grad(loss, list(base.parameters()))

    apply(model=patched)
    assert patched.config._attn_implementation == "phi_kernels"
    patched.eval()
    torch.testing.assert_close(patched(x).logits, logits, rtol=1e-4, atol=1e-4)
    patched.train()
    out = patched(x, labels=labels)
    assert out.logits is None  # the fused loss never made them
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, e in zip(patched.named_parameters(), torch.autograd.grad(out.loss, list(patched.parameters())),
                               grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fused_loss_with_num_items_in_batch_and_shift_labels_like_transformers():
    base, patched, apply = _pair("llama-hd64")
    x = torch.randint(0, VOCAB, (2, 9))
    n = torch.tensor(11)
    expect = base(x, labels=x, num_items_in_batch=n).loss
    apply(model=patched, rotary=False, attention=False)
    torch.testing.assert_close(patched(x, labels=x, num_items_in_batch=n).loss, expect, rtol=1e-5, atol=1e-6)
    shifted = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(patched(x, labels=x, shift_labels=shifted).loss, base(x, labels=x).loss)
    patched.eval()  # evaluation keeps the logits (and the loss is the same)
    out = patched(x, labels=x)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, base.eval()(x, labels=x).loss)


# ----------------------------------------------------------------------------- padding, packing, decoding


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["phi-hd80", "llama-hd64", "mistral-swa"])
def test_padded_batch_equals_each_row_alone(arch, side):
    base, patched, apply = _pair(arch)
    lengths = [11, 6, 3]
    rows = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    t = max(lengths)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    positions = _left_pad_positions(mask)
    base.eval()
    expect_batch = base(ids, attention_mask=mask, position_ids=positions).logits
    apply(model=patched)
    patched.eval()
    got = patched(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expect_batch[real], rtol=1e-4, atol=1e-4)  # vs transformers' sdpa
    for i, r in enumerate(rows):
        alone = patched(r[None]).logits[0]
        torch.testing.assert_close(got[i][real[i]], alone, rtol=1e-4, atol=1e-4)
    assert bool((got[~real] == got[~real]).all())  # padding rows are finite numbers, not NaN


def test_packed_sequences_by_position_ids_equal_each_sequence_alone():
    _, patched, apply = _pair("llama-hd80")
    apply(model=patched)
    patched.eval()
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (5, 8, 3)]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    got = patched(ids, position_ids=positions).logits[0]
    start = 0
    for s in seqs:
        torch.testing.assert_close(got[start:start + len(s)], patched(s[None]).logits[0], rtol=1e-4, atol=1e-4)
        start += len(s)


@pytest.mark.parametrize("arch", ["phi-hd64", "mistral-swa"])
def test_generate_left_padded_batch_matches_unpatched(arch):
    base, patched, apply = _pair(arch)
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expect = base.eval().generate(ids, **kw)
    apply(model=patched)
    torch.testing.assert_close(patched.eval().generate(ids, **kw), expect)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_function_softcap_window_gqa_padding_against_dense_math(causal):
    """The interface function alone, on what a Gemma-like model passes (softcap, a sliding window,
    GQA, a right-padded 2-D mask), against the dense softmax written out here."""
    from phi_kernels.integrations._hf_attention import phi_kernels_attention_forward

    b, h, hkv, t, d, window, cap, scale = 2, 4, 2, 9, 64, 4, 5.0, 0.2
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 6:] = False
    module = torch.nn.Module()
    module.is_causal = causal
    out, _ = phi_kernels_attention_forward(module, q, k, v, mask, scaling=scale, sliding_window=window, softcap=cap)
    kk, vv = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)  # (b, h, t, d)
    s = cap * torch.tanh(q @ kk.transpose(-1, -2) * scale / cap)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    visible = ((j <= i) if causal else (j <= i + window - 1)) & (j >= i - (window - 1))  # flash_attention_2's window
    visible = visible & mask[:, None, None, :]
    expect = (s.masked_fill(~visible, float("-inf")).softmax(-1) @ vv).transpose(1, 2)  # (b, t, h, d)
    torch.testing.assert_close(out[mask], expect[mask], rtol=1e-5, atol=1e-5)
    assert bool((out[~mask] == 0).all())


# ----------------------------------------------------------------------------- loading and class patches


def test_from_pretrained_with_attn_implementation_phi_kernels(tmp_path):
    base, _, _ = _pair("phi-hd64")
    base.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="phi_kernels").eval()
    assert model.config._attn_implementation == "phi_kernels"
    x = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    real = mask.bool()
    torch.testing.assert_close(model(x, attention_mask=mask).logits[real],
                               base.eval()(x, attention_mask=mask).logits[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["phi-hd64", "llama-hd64"])
def test_attn_implementation_under_autocast_matches_sdpa(arch, tmp_path):
    """Under torch.autocast transformers' rotary leaves q and k in fp32 and v in bf16: the
    attention runs in bf16 as SDPA does there (it raised "q, k, v must share a dtype")."""
    base, _, _ = _pair(arch)
    base.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="phi_kernels")
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(x, labels=x), sdpa(x, labels=x)
        out.loss.backward()
        with torch.no_grad():
            generated = ours.generate(x[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.logits.dtype == ref.logits.dtype
    scale = ref.logits.float().abs().max().item()
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), atol=0.03 * scale, rtol=0.03)
    assert abs(out.loss.item() - ref.loss.item()) < 0.02 * ref.loss.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
    assert generated.shape == (1, 10)


def test_class_patch_applies_to_new_models_and_reverts():
    original_rotary, original_forward = modeling_llama.apply_rotary_pos_emb, LlamaForCausalLM.forward
    _, cfg, _ = _llama(64)
    pk.apply_phi_kernels_to_llama()
    pk.apply_phi_kernels_to_llama()  # twice is once
    model = LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == "phi_kernels"
    assert modeling_llama.apply_rotary_pos_emb is pk.rotary_pos_emb
    assert LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "_attn_implementation": "eager"})) \
        .config._attn_implementation == "eager"  # an explicit request still wins
    model.train()
    assert model(torch.randint(0, VOCAB, (1, 6)), labels=torch.randint(0, VOCAB, (1, 6))).logits is None
    pk.revert_phi_kernels_patches()
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert LlamaForCausalLM.forward is original_forward
    assert LlamaForCausalLM(_llama(64)[1]).config._attn_implementation == "sdpa"  # (cfg holds its choice)


# ----------------------------------------------------------------------------- refusals


def test_refuses_what_the_kernels_cannot_do():
    base, patched, apply = _pair("llama-hd64")
    with pytest.raises(TypeError, match="apply_phi_kernels_to_phi.*PhiForCausalLM.*got LlamaForCausalLM"):
        pk.apply_phi_kernels_to_phi(model=patched)
    with pytest.raises(TypeError, match="rotary must be a bool"):
        apply(model=patched, rotary="yes")
    with pytest.raises(TypeError, match="fused_linear_cross_entropy=True needs a LlamaForCausalLM"):
        apply(model=patched.model)
    assert patched.config._attn_implementation == "sdpa"  # the refusals changed nothing
    apply(model=patched)
    x = torch.randint(0, VOCAB, (1, 6))
    dense = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2-D padding attention_mask.*shape \\(1, 1, 6, 6\\)"):
        patched(x, attention_mask=dense)
    with pytest.raises(ValueError, match="output_attentions"):
        patched(x, output_attentions=True)
    with pytest.raises(ValueError, match="cannot express the attention mask function chunked_overlay"):
        check_mask_function(chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)))

    def causal_mask_function(batch_idx, head_idx, q_idx, kv_idx):  # a user's, named like transformers'
        return kv_idx <= q_idx + 1

    with pytest.raises(ValueError, match="cannot express .*test_integrations_transformers.*causal_mask_function"):
        check_mask_function(causal_mask_function)


def test_sliding_window_refuses_a_mask_with_holes():
    _, patched, apply = _pair("mistral-swa")
    apply(model=patched)
    x = torch.randint(0, VOCAB, (1, 8))
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="sliding window needs each row's real tokens contiguous"):
        patched.eval()(x, attention_mask=holes)


# ----------------------------------------------------------------------------- Trainer


class _RecordingTrainer(transformers.Trainer):
    losses: list

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


def _train(model, tmp_path, **trainer_kw) -> list[float]:
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(80):
        n = 6 + i % 7
        ids = torch.randint(0, VOCAB, (12,), generator=g)
        mask = (torch.arange(12) < n).long()  # right padding, labels ignored there
        data.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=20,
                                          learning_rate=2e-3, weight_decay=0.1, warmup_steps=2, logging_steps=5,
                                          save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                          dataloader_num_workers=0, disable_tqdm=True)
    trainer = _RecordingTrainer(model=model, args=args, train_dataset=data, **trainer_kw)
    trainer.losses = []
    trainer.train()
    return trainer.losses


def test_trainer_20_steps_patched_with_fused_adam_follow_unpatched_adamw(tmp_path):
    base, patched, apply = _pair("phi-hd64")
    expect = _train(base, tmp_path / "base")  # Trainer's own AdamW (optim="adamw_torch")
    apply(model=patched)
    got = _train(patched, tmp_path / "patched",
                 optimizer_cls_and_kwargs=(FusedAdam, dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8)))
    assert len(got) == len(expect) == 20
    assert expect[-1] < expect[0]  # it learns
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), rtol=1e-4, atol=0)
