"""phi_model.PhiForCausalLM answering Hugging Face calls: attention_mask in forward (left and right
padding: each row's logits, loss and gradients as if alone; against transformers' Phi on the same
weights) and generate() returning what transformers' generate returns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi_model import PhiConfig, PhiForCausalLM

transformers = pytest.importorskip("transformers")

VOCAB, EOS = 97, 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, transformers' PhiForCausalLM with the same weights, eager attention)."""
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=160, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.4,
                    max_position_embeddings=64, eos_token_id=EOS)  # head_dim 80, GQA
    ours = PhiForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("phi")
    ours.save_pretrained(str(path))
    theirs = transformers.PhiForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return ours, theirs


def _padded(rows, side):
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


def _rows(lengths=(10, 4, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(EOS + 1, VOCAB, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal_each_row_alone_and_transformers(models, side):
    ours, theirs = models
    rows = _rows()
    ids, mask = _padded(rows, side)
    got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i][real[i]], ours(r[None]).logits[0], rtol=1e-5, atol=1e-5)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what transformers' generate passes for left padding
    expect = theirs(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got[real], expect[real], rtol=1e-4, atol=1e-4)
    pad_logits = got[~real]
    torch.testing.assert_close(pad_logits, ours.lm_head.bias.expand_as(pad_logits))  # lm_head(0), documented


@pytest.mark.parametrize("return_logits", [True, False], ids=["logits", "fused"])
def test_padded_batch_loss_and_gradients_equal_the_rows_alone(models, return_logits):
    ours, _ = models
    rows = _rows((9, 3, 6), seed=2)
    ids, mask = _padded(rows, "left")
    params = list(ours.parameters())
    loss = ours(ids, labels=ids, attention_mask=mask, return_logits=return_logits).loss  # pads: labels not -100
    grads = torch.autograd.grad(loss, params)
    # The oracle: each row alone, its next-token targets, one mean over all of them.
    logits = torch.cat([ours(r[None]).logits[0, :-1] for r in rows])
    targets = torch.cat([r[1:] for r in rows])
    expect = F.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, torch.autograd.grad(expect, params)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_attention_mask_with_documents_and_all_ones(models):
    ours, _ = models
    rows = _rows((8, 5), seed=3)
    rows[0][3] = EOS  # row 0 holds two documents
    ids, mask = _padded(rows, "right")
    got = ours(ids, attention_mask=mask, eos_token_id=EOS).logits
    first, second = rows[0][:4], rows[0][4:]
    torch.testing.assert_close(got[0, :4], ours(first[None]).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0, 4:8], ours(second[None]).logits[0], rtol=1e-5, atol=1e-5)
    full = torch.randint(EOS + 1, VOCAB, (2, 6))
    torch.testing.assert_close(ours(full, attention_mask=torch.ones_like(full)).logits, ours(full).logits,
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- generate


def test_generate_matches_transformers_left_padded_greedy_with_eos_padding(models):
    ours, theirs = models
    rows = _rows((6, 3, 5), seed=4)
    ids, mask = _padded(rows, "left")
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token: row 0 then stops there
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    expect = theirs.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    torch.testing.assert_close(got, expect)
    assert got.shape[0] == 3 and bool((got[0, ids.shape[1] + 2:] == 0).all())  # padded after its EOS
    torch.testing.assert_close(got[:, :ids.shape[1]], ids)  # the prompts as given, padding included


def test_generate_right_padding_rows_equal_each_prompt_alone_and_sampling_is_seeded(models):
    ours, _ = models
    rows = _rows((7, 2), seed=5)
    ids, mask = _padded(rows, "right")
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None)
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i, ids.shape[1]:], ours.generate(r[None], max_new_tokens=4,
                                                                         eos_token_id=None)[0, len(r):])
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_p=0.9, seed=7)
    b = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_p=0.9, seed=7)
    torch.testing.assert_close(a, b)
    assert ours.generate(ids, max_new_tokens=0).shape == ids.shape


def test_bad_attention_mask_and_generate_arguments_are_named(models):
    ours, _ = models
    ids = torch.randint(EOS + 1, VOCAB, (2, 5))
    for mask, match in ((torch.ones(2, 5), "0/1 \\(bool or integer\\), got torch.float32"),
                        (torch.ones(2, 4, dtype=torch.long), "shaped like input_ids \\(2, 5\\)"),
                        (torch.full((2, 5), 2), "only 0 \\(padding\\) and 1")):
        with pytest.raises(ValueError, match=f"attention_mask must .*{match}"):
            ours(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask is not taken with caches"):
        ours(ids, attention_mask=torch.ones_like(ids), caches=ours.new_caches(2, 8))
    for kw, match in ((dict(do_sample=True, temperature=0.0), "temperature must be a number > 0"),
                      (dict(eos_token_id=[1, 2]), "eos_token_id must be one int"),
                      (dict(do_sample=1), "do_sample must be a bool"),
                      (dict(top_p=1.5, do_sample=True), "top_p"),
                      (dict(max_new_tokens=-1), "max_new_tokens"),
                      (dict(attention_mask=torch.zeros(2, 5, dtype=torch.long)), "prompt 0 is empty")):
        with pytest.raises(ValueError, match=match):
            ours.generate(ids, **kw)
    with pytest.raises(TypeError, match="num_beams"):
        ours.generate(ids, num_beams=2)
