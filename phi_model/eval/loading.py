"""One loader for the checkpoints the evaluators accept, and text completion over either kind.

    lm = load_causal_lm("out/final")              # phi_model for Phi, transformers otherwise
    lm.complete(["def f(x):\\n"], max_new_tokens=64, stop=["\\ndef"])

A directory whose config.json is a Phi model (transformers' `phi`, or Microsoft's `phi-msft`
format) loads into phi_model.PhiForCausalLM, so generation runs on our kernels with
phi_model.generate's KV-cache batched decoding; any other causal LM transformers can load uses
AutoModelForCausalLM, with our flash attention (attn_implementation="phi_kernels") where the
model class supports transformers' attention interface. The tokenizer: the directory's
transformers tokenizer files, or a bare tokenizer.json (what train/pretrain.py exports into
out/final).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from phi_model.json_file import read_json_object

PHI_MODEL_TYPES = ("phi", "phi-msft", "mixformer-sequential")


class _AllStopped(Exception):
    """Raised from generate's on_token hook once every row has met a stop sequence (generate has
    no stopping-criteria argument; its per-token callback is the one place to end early)."""


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """text up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def is_phi_checkpoint(directory: str) -> bool:
    cfg = read_json_object(os.path.join(directory, "config.json"), expected="a model config (a JSON object)")
    return cfg.get("model_type") in PHI_MODEL_TYPES or "n_embd" in cfg


def load_tokenizer(directory: str):
    """transformers tokenizer of the directory: its tokenizer files, or a bare tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(directory)
    elif os.path.exists(os.path.join(directory, "tokenizer.json")):
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"))
    else:
        raise FileNotFoundError(f"{directory}: no tokenizer (tokenizer_config.json or tokenizer.json) in the "
                                "checkpoint directory")
    return tok


@dataclass
class CausalLM:
    """A loaded checkpoint: `kind` is "phi_model" or "transformers"; `attention` says which
    attention runs ("phi_model", "phi_kernels", or transformers' own and why)."""
    model: torch.nn.Module
    tokenizer: object
    kind: str
    eos_token_id: int | None
    max_length: int
    batch_size: int = 8
    attention: str = ""  # the attention implementation the model runs with

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Logits (B, T, V) in float32 of right-padded ids (B, T); row b's first lengths[b] are real.
        Causal attention: padding after a row's tokens never changes their logits."""
        with torch.no_grad():
            if self.kind == "phi_model":
                return self.model(ids).logits.float()
            mask = (torch.arange(ids.shape[1], device=ids.device)[None, :]
                    < torch.tensor(lengths, device=ids.device)[:, None]).long()
            return self.model(input_ids=ids, attention_mask=mask).logits.float()

    def complete(self, prompts: list[str], *, max_new_tokens: int, stop: list[str], temperature: float = 0.0,
                 top_p: float | None = None, seed: int | None = None,
                 on_batch: Callable[[int], None] | None = None) -> list[str]:
        """One completion per prompt, cut at the first stop sequence (see complete_ids)."""
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.complete_ids(encoded, max_new_tokens=max_new_tokens, stop=stop, temperature=temperature,
                                 top_p=top_p, seed=seed, on_batch=on_batch)

    def complete_ids(self, encoded: list[list[int]], *, max_new_tokens: int, stop: list[str],
                     temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
        """Completions of token-id prompts, decoded in batches of similar length (batch_size rows
        per call), each cut at the first stop sequence. A prompt that leaves no room in the
        model's context (max_length) gets "". on_batch(n): n more prompts are done."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = [""] * len(encoded)
        fits = [i for i in order if 0 < len(encoded[i]) < self.max_length]
        if on_batch is not None and len(fits) < len(encoded):
            on_batch(len(encoded) - len(fits))
        for start in range(0, len(fits), self.batch_size):
            rows = fits[start:start + self.batch_size]
            room = min(max_new_tokens, self.max_length - max(len(encoded[i]) for i in rows))
            texts = self._generate([encoded[i] for i in rows], room, stop, temperature, top_p, seed)
            for i, text in zip(rows, texts):
                out[i] = truncate_at_stop(text, stop)
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def _generate(self, batch: list[list[int]], max_new_tokens: int, stop: list[str], temperature: float,
                  top_p: float | None, seed: int | None) -> list[str]:
        if self.kind == "phi_model":
            return self._generate_phi(batch, max_new_tokens, stop, temperature, top_p, seed)
        return self._generate_hf(batch, max_new_tokens, temperature, top_p, seed)

    def _generate_phi(self, batch, max_new_tokens, stop, temperature, top_p, seed) -> list[str]:
        from phi_model.generate import generate

        new: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)

        def on_token(i: int, token: int) -> None:
            if done[i]:
                return  # stopped rows still decode (the batch keeps its shape); their tokens are dropped
            new[i].append(token)
            if token == self.eos_token_id or any(s in self.tokenizer.decode(new[i]) for s in stop):
                done[i] = True
                if all(done):
                    raise _AllStopped

        try:
            generate(self.model, batch, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                     eos_token_id=self.eos_token_id, on_token=on_token)
        except _AllStopped:
            pass
        return [self.tokenizer.decode([t for t in ids if t != self.eos_token_id]) for ids in new]

    def _generate_hf(self, batch, max_new_tokens, temperature, top_p, seed) -> list[str]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos_token_id or 0)
        longest = max(len(p) for p in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding: every row's next token at the same column
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p or 1.0) if temperature > 0 \
            else dict(do_sample=False)
        with torch.no_grad():
            seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       max_new_tokens=max_new_tokens, pad_token_id=pad,
                                       eos_token_id=self.eos_token_id, **kwargs)
        texts = []
        for row in seqs[:, longest:].tolist():
            if self.eos_token_id in row:
                row = row[:row.index(self.eos_token_id)]
            texts.append(self.tokenizer.decode(row))
        return texts


def load_causal_lm(directory: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   batch_size: int = 8) -> CausalLM:
    """Loads a checkpoint directory (see the module docstring); errors name the directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--checkpoint {directory!r}: not a directory")
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"--checkpoint {directory!r}: no config.json (expected a phi_model or Hugging Face "
                                "format checkpoint directory)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tokenizer = load_tokenizer(directory)
    if is_phi_checkpoint(directory):
        from phi_model.model import PhiForCausalLM

        model = PhiForCausalLM.from_pretrained(directory, dtype=dtype, device=device).eval()
        eos, max_length = model.config.eos_token_id, model.config.max_position_embeddings
        kind = "phi_model"
        attention = "phi_model"
    else:
        model, attention = _load_transformers_model(directory, dtype)
        model = model.to(device).eval()
        eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else tokenizer.eos_token_id
        max_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        kind = "transformers"
    return CausalLM(model=model, tokenizer=tokenizer, kind=kind, eos_token_id=eos, max_length=int(max_length),
                    batch_size=batch_size, attention=attention)


def _load_transformers_model(directory: str, dtype: torch.dtype | None) -> tuple[torch.nn.Module, str]:
    """The model with our attention (attn_implementation="phi_kernels", registered by
    phi_kernels.integrations.transformers) when its class takes an attention implementation;
    otherwise transformers' default attention. Returns (model, the attention used)."""
    from transformers import AutoModelForCausalLM

    import phi_kernels.integrations.transformers as integration

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                     attn_implementation=integration.ATTN_IMPLEMENTATION)
        return model, integration.ATTN_IMPLEMENTATION
    except (ValueError, NotImplementedError) as e:  # a model class without the attention interface
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        return model, f"{model.config._attn_implementation} (phi_kernels attention not applicable: {e})"
