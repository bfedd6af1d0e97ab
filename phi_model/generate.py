"""Text generation with a preallocated KV cache.

    python -m phi_model.generate --checkpoint DIR --prompt "def fibonacci(n):" [--max-new-tokens 64]

DIR is a Hugging Face phi directory (config.json, weights, tokenizer.json): a real phi-1.5
download works, and so does train/pretrain.py's exported out/final. Tokens stream to stdout.
"""
from __future__ import annotations

import argparse
import math
import numbers
import os
import sys
from typing import Callable, Iterator

import torch
from torch import Tensor

from phi_model.model import PhiForCausalLM


def sample_next(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else sampled after
    top-k and nucleus (top-p) filtering. generator: one for the batch, or one per row (a row's
    draws then do not depend on the other rows). temperature >= 0, top_k None or >= 0 (0 = off),
    top_p None or in (0, 1] (1 = off); anything else is a ValueError naming the argument."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # Shifted by the row maximum first (softmax is unchanged): a tiny temperature then sends the
    # other logits to -inf instead of the maximum to +inf (inf - inf = NaN probabilities).
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_sampling(temperature, top_k, top_p, seed=None, *, cli: bool = False) -> None:
    """ValueError naming the argument (the flag with cli=True) unless temperature is a finite
    number >= 0 (0 = greedy), top_k None or an int >= 0 (0 = no top-k), top_p None or a number in
    (0, 1] (1 = no nucleus filtering), seed None or an int."""
    def name(a):
        return "--" + a.replace("_", "-") if cli else a

    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"{name('top_k')} must be None or an int >= 0 (0 = no top-k filtering), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"{name('top_p')} must be None or a number in (0, 1] (1 = no nucleus filtering), "
                         f"got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"{name('seed')} must be None or an int, got {seed!r}")


def _token_ids(prompt, where: str) -> list[int]:
    """One prompt as a list of Python ints: a list/tuple of ints, or a 1-D integer tensor (or
    numpy array). Floats, bools, strings and float tensors are refused, not truncated."""
    if isinstance(prompt, Tensor) or hasattr(prompt, "dtype") and hasattr(prompt, "tolist"):
        dtype = prompt.dtype
        is_int = (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool) \
            if isinstance(prompt, Tensor) else getattr(dtype, "kind", None) in ("i", "u")
        if not is_int or prompt.ndim != 1:
            raise ValueError(f"{where} must be a 1-D integer tensor of token ids, got {dtype} shape "
                             f"{tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"{where} must be a list of token ids, got {type(prompt).__name__}")
    prompt = [t.item() if isinstance(t, Tensor) and t.dim() == 0 and not t.dtype.is_floating_point
              and t.dtype != torch.bool else t for t in prompt]
    for j, t in enumerate(prompt):
        if not _is_int(t):
            raise ValueError(f"{where}: token {j} is {t!r} ({type(t).__name__}); token ids must be integers")
    return [int(t) for t in prompt]


def _prompt_batch(prompts) -> tuple[list[list[int]], bool]:
    """(list of prompts, whether a single prompt was given) from a list of ids, a list of
    lists, a 1-D tensor (one prompt) or a 2-D tensor (a batch)."""
    if isinstance(prompts, Tensor) and prompts.dim() == 2:
        return [_token_ids(row, f"prompts[{i}]") for i, row in enumerate(prompts)], False
    if isinstance(prompts, Tensor) or hasattr(prompts, "dtype"):
        return [_token_ids(prompts, "prompts")], True
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of token ids or a list of such lists, got {type(prompts).__name__}")

    def is_seq(p):
        return isinstance(p, (list, tuple)) or (hasattr(p, "ndim") and p.ndim >= 1)

    if len(prompts) and not any(is_seq(t) for t in prompts):  # one prompt (its ids are checked next)
        return [_token_ids(prompts, "prompts")], True
    if not all(is_seq(t) for t in prompts):
        raise ValueError("prompts mixes token ids and lists: give one list of ids, or a list of lists")
    return [_token_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)], False


def _check_prompts(prompts: list[list[int]], max_new_tokens: int, model: PhiForCausalLM | None = None) -> None:
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if model is None:
        return
    cfg = model.config
    for i, p in enumerate(prompts):
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt {i}: token id {bad} at position {p.index(bad)} is out of range: ids must be in "
                             f"[0, vocab_size={cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{longest + max_new_tokens} exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings}): lower max_new_tokens to at most "
                         f"{max(cfg.max_position_embeddings - longest, 0)} or shorten the prompt")


def _check_all(model, batch, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id) -> None:
    """Every argument, before any compute."""
    _check_prompts(batch, max_new_tokens, model)
    check_sampling(temperature, top_k, top_p, seed)
    if eos_token_id is not None and not _is_int(eos_token_id):
        raise ValueError(f"eos_token_id must be None or an int, got {eos_token_id!r}")


@torch.no_grad()
def _decode(model: PhiForCausalLM, prompts: list[list[int]], max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, seed: int | None, use_cache: bool) -> Iterator[Tensor]:
    """Yields the next token of every prompt, a (B,) tensor per step, max_new_tokens times (the
    caller may stop early).

    Prompts of different lengths are right-padded into one batch and prefilled together from
    position 0: under the causal mask a row's real tokens never see its padding. The logits of row
    b are read at its last real token, and from then on row b writes its token at its own position
    len(prompt b) + step (overwriting the padding in its cache) and attends to its own prefix only:
    model(..., cache_pos=<int32 (B,) tensor>) -> phi_kernels.flash_attn_with_kvcache.
    """
    device = model.lm_head.weight.device
    lens = [len(p) for p in prompts]
    b, longest = len(prompts), max(lens)
    ids = torch.zeros(b, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :lens[i]] = torch.as_tensor(p, dtype=torch.long)
    # One generator per prompt, all from the seed: a prompt samples the same tokens alone or in a
    # batch (up to the batch's rounding differences in the logits).
    gen = [torch.Generator(device=device).manual_seed(seed) for _ in prompts] if seed is not None else None
    last = torch.tensor(lens, device=device) - 1
    caches = model.new_caches(b, longest + max_new_tokens) if use_cache else None
    logits = model(ids, caches=caches, cache_pos=0, logits_at=last).logits[:, 0]
    # One int position when every row is alike (the plain attention path), else per-row positions.
    pos: int | Tensor = longest if len(set(lens)) == 1 else torch.tensor(lens, dtype=torch.int32, device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        yield nxt
        if step + 1 == max_new_tokens:
            return  # no forward for a token nobody will read
        if use_cache:
            logits = model(nxt.view(b, 1), caches=caches, cache_pos=pos).logits[:, -1]
            pos = pos + 1
        else:  # the oracle: the whole sequence again, no cache
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            logits = model(ids).logits[:, -1]


def generate_stream(model: PhiForCausalLM, prompt_ids: list[int] | Tensor, max_new_tokens: int = 64, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, eos_token_id: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yields new token ids one by one for a single prompt (stops after eos_token_id). The
    arguments are validated when this is called, before the first token is asked for."""
    prompt = _token_ids(prompt_ids, "prompt_ids")
    _check_all(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)
    return _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, use_cache)


def _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, use_cache) -> Iterator[int]:
    was_training = model.training
    model.eval()
    try:
        for nxt in _decode(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, use_cache):
            token = int(nxt)
            yield token
            if eos_token_id is not None and token == eos_token_id:
                return
    finally:
        model.train(was_training)


def generate(model: PhiForCausalLM, prompts: list[list[int]] | list[int], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | None = None, use_cache: bool = True,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New tokens for one prompt (a list of ids) or a batch of prompts of any lengths (a list of
    lists), decoded together in one batch with a KV cache. Returns one list of new ids per prompt,
    each ending at its first eos_token_id or at max_new_tokens; on_token(i, id) is called as the
    tokens of prompt i arrive. Greedy results equal decoding each prompt alone. With
    use_cache=False (the uncached oracle) prompts run one after another. A 1-D integer tensor is
    one prompt, a 2-D one a batch.

    Every argument is checked before any compute, with a ValueError naming it: token ids must be
    integers in [0, vocab_size); temperature a finite number >= 0 (0 = greedy); top_k None or an
    int >= 0 (0 = off); top_p None or in (0, 1]; and the longest prompt + max_new_tokens must fit
    the model's max_position_embeddings."""
    batch, _ = _prompt_batch(prompts)
    _check_all(model, batch, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)
    if not use_cache and len(batch) > 1:
        return [generate(model, p, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         eos_token_id=eos_token_id, use_cache=False,
                         on_token=None if on_token is None else (lambda _, t, i=i: on_token(i, t)))[0]
                for i, p in enumerate(batch)]
    outs: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    was_training = model.training
    model.eval()
    try:
        for nxt in _decode(model, batch, max_new_tokens, temperature, top_k, top_p, seed, use_cache):
            for i, token in enumerate(nxt.tolist()):
                if done[i]:
                    continue  # a finished row still decodes (batch shapes stay fixed); its tokens are dropped
                outs[i].append(token)
                if on_token is not None:
                    on_token(i, token)
                done[i] = eos_token_id is not None and token == eos_token_id
            if all(done):
                break
    finally:
        model.train(was_training)
    return outs


def generate_like_transformers(model: PhiForCausalLM, input_ids: Tensor, *, max_new_tokens: int = 20,
                               do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                               top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                               pad_token_id: int | None = None, attention_mask: Tensor | None = None,
                               seed: int | None = None) -> Tensor:
    """transformers' `model.generate(input_ids, ...)` on `generate`: input_ids (B, T) as given
    (padding included; attention_mask (B, T) of 0/1 says which tokens are real, left or right
    padding) followed by the new tokens, a (B, T + n) tensor where n is the longest row's count of
    new tokens; a row that ended at eos_token_id is filled after it with pad_token_id (default: the
    EOS, as transformers does). do_sample=False is greedy; do_sample=True samples with
    transformers' defaults temperature 1.0 and top_k 50 unless given. eos_token_id defaults to the
    model config's. Every argument is checked before any compute (ValueError naming it)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
            or input_ids.dtype == torch.bool:
        raise ValueError("input_ids must be a (batch, seqlen) integer tensor, got "
                         + (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                            else type(input_ids).__name__))
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
    if do_sample:
        temperature = 1.0 if temperature is None else temperature
        top_k = 50 if top_k is None else top_k
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0 with do_sample=True, got {temperature!r}")
    else:
        temperature = 0.0  # greedy; transformers ignores the sampling knobs here too
    if isinstance(eos_token_id, (list, tuple)):
        if len(eos_token_id) != 1:
            raise ValueError(f"eos_token_id must be one int (or a list of one), got {eos_token_id!r}")
        eos_token_id = eos_token_id[0]
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if pad is not None and not _is_int(pad):
        raise ValueError(f"pad_token_id must be None or an int, got {pad_token_id!r}")
    rows = input_ids.tolist()
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape \
                or attention_mask.dtype.is_floating_point:
            raise ValueError(f"attention_mask must be a 0/1 (bool or integer) tensor shaped like input_ids "
                             f"{tuple(input_ids.shape)}, got "
                             + (f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                                if isinstance(attention_mask, Tensor) else type(attention_mask).__name__))
        keep = attention_mask.tolist()
        if any(v not in (0, 1) for r in keep for v in r):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        rows = [[t for t, k in zip(r, m) if k] for r, m in zip(rows, keep)]
    new = generate(model, rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   eos_token_id=eos_token_id)  # checks the prompts, lengths and sampling knobs
    n = max((len(x) for x in new), default=0)
    # Rows end early only at an EOS, so without one (pad None) every row has n tokens.
    out = input_ids.new_full((input_ids.shape[0], n), pad if pad is not None else 0)
    for i, x in enumerate(new):
        out[i, :len(x)] = torch.as_tensor(x, dtype=out.dtype)
    return torch.cat([input_ids, out], dim=1)


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
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.seed, cli=True)
    except ValueError as e:
        ap.error(str(e))
    if args.max_new_tokens < 0:
        ap.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    tok_path = os.path.join(args.checkpoint, "tokenizer.json")
    if not os.path.exists(tok_path):
        ap.error(f"{tok_path} not found: the checkpoint directory must hold the tokenizer (tokenizer.json)")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tok_path)
    model = PhiForCausalLM.from_pretrained(args.checkpoint, device=args.device)
    ids = tokenizer.encode(args.prompt).ids
    eos = model.config.eos_token_id
    try:
        stream = generate_stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, eos_token_id=eos)
    except ValueError as e:  # e.g. the prompt + --max-new-tokens past the model's positions
        ap.error(str(e))
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    produced: list[int] = []
    printed = ""
    for tok in stream:
        produced.append(tok)
        text = tokenizer.decode(produced)  # decode the whole tail: byte-level BPE pieces join correctly
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
