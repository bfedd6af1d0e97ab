"""Text generation with a preallocated KV cache.

    python -m phi_model.generate --checkpoint DIR --prompt "def fibonacci(n):" [--max-new-tokens 64]

DIR is a Hugging Face phi directory (config.json, weights, tokenizer.json): a real phi-1.5
download works, and so does train/pretrain.py's exported out/final. Tokens stream to stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Iterator

import torch
from torch import Tensor

from phi_model.model import PhiForCausalLM


def sample_next(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else sampled after
    top-k and nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_stream(model: PhiForCausalLM, prompt_ids: list[int] | Tensor, max_new_tokens: int = 64, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, eos_token_id: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yields new token ids one by one for a single prompt."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.lm_head.weight.device).view(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("prompt_ids must not be empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    gen = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        caches = model.new_caches(1, ids.shape[1] + max_new_tokens) if use_cache else None
        logits = model(ids, caches=caches, cache_pos=0).logits[:, -1]
        pos = ids.shape[1]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            token = int(nxt)
            yield token
            if eos_token_id is not None and token == eos_token_id:
                return
            if use_cache:
                logits = model(nxt.view(1, 1), caches=caches, cache_pos=pos).logits[:, -1]
            else:
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
                logits = model(ids).logits[:, -1]
            pos += 1
    finally:
        model.train(was_training)


def generate(model: PhiForCausalLM, prompts: list[list[int]] | list[int], max_new_tokens: int = 64, *,
             on_token: Callable[[int, int], None] | None = None, **kwargs) -> list[list[int]]:
    """New tokens for one prompt (list of ids) or several of different lengths (list of lists).
    Prompts of different lengths run one after another (each with its own cache); on_token(i, id)
    is called as tokens arrive."""
    single = len(prompts) > 0 and isinstance(prompts[0], int)
    batch = [prompts] if single else prompts
    outs = []
    for i, p in enumerate(batch):
        toks = []
        for tok in generate_stream(model, p, max_new_tokens, **kwargs):
            toks.append(tok)
            if on_token is not None:
                on_token(i, tok)
        outs.append(toks)
    return outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate text from a phi checkpoint directory")
    ap.add_argument("--checkpoint", required=True, help="Hugging Face format directory with tokenizer.json")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    tok_path = os.path.join(args.checkpoint, "tokenizer.json")
    if not os.path.exists(tok_path):
        ap.error(f"{tok_path} not found: the checkpoint directory must hold the tokenizer (tokenizer.json)")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tok_path)
    model = PhiForCausalLM.from_pretrained(args.checkpoint, device=args.device)
    ids = tokenizer.encode(args.prompt).ids
    eos = model.config.eos_token_id
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    produced: list[int] = []
    printed = ""
    for tok in generate_stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, eos_token_id=eos):
        produced.append(tok)
        text = tokenizer.decode(produced)  # decode the whole tail: byte-level BPE pieces join correctly
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
