"""phi-1.5 in one file, running on phi_kernels (rotary: apply_rotary; attention: flash_attn_*).

Block (parallel attention + MLP, one LayerNorm):   x = x + attn(ln(x)) + mlp(ln(x))
Module names match transformers' PhiForCausalLM, so Hugging Face state dicts load as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import phi_kernels
from phi_model.config import PhiConfig
from phi_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy


@dataclass
class CausalLMOutput:
    logits: Tensor | None  # (B, T, V); None when the loss was fused (return_logits=False)
    loss: Tensor | None = None


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (B, max_len, kv_heads, head_dim). Rows may be
    filled to different lengths (batched prompts of different lengths): the model is then given
    cache_pos as an int32 tensor (B,) of per-row positions."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)


def document_cu_seqlens(input_ids: Tensor, eos_token_id: int) -> tuple[Tensor, int]:
    """cu_seqlens (int32) splitting the flattened (B*T) tokens into documents: a new document
    starts at every row start and right after every EOS token. Returns (cu_seqlens, max_len)."""
    _, cu, max_len = packed_layout(input_ids, None, eos_token_id)
    return cu, max_len


def packed_layout(input_ids: Tensor, attention_mask: Tensor | None,
                  eos_token_id: int | None) -> tuple[Tensor | None, Tensor, int]:
    """The real tokens of a (B, T) batch as packed sequences for the varlen kernels:
    (rows, cu_seqlens, max_len). rows: indices into the flattened B*T tokens of the real ones
    (attention_mask != 0), in order (None without a mask: every token). A sequence starts at each
    row's first real token and, with eos_token_id, right after every EOS; rotary positions
    restart there, so a padded row sees exactly what it would alone."""
    b, t = input_ids.shape
    ids = input_ids.reshape(-1)
    row_of = torch.arange(b, device=ids.device).repeat_interleave(t)  # (B*T,)
    rows = None
    if attention_mask is not None:
        rows = attention_mask.reshape(-1).nonzero().flatten()  # (N,)
        ids, row_of = ids[rows], row_of[rows]
    n = ids.numel()
    starts = torch.ones(n, dtype=torch.bool, device=ids.device)
    starts[1:] = row_of[1:] != row_of[:-1]
    if eos_token_id is not None:
        starts[1:] |= ids[:-1] == eos_token_id
    first = starts.nonzero().flatten()
    cu = torch.cat([first, first.new_tensor([n])]).to(torch.int32)
    return rows, cu, int((cu[1:] - cu[:-1]).max()) if n else 0


def _check_attention_mask(mask, input_ids: Tensor, caches) -> Tensor:
    """attention_mask as a bool (B, T) tensor on input_ids' device, or a ValueError naming it."""
    if not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                         + (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__))
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"attention_mask must hold 0/1 (bool or integer), got {mask.dtype}")
    if mask.device != input_ids.device:
        raise ValueError(f"attention_mask must be on input_ids' device {input_ids.device}, got {mask.device}")
    if caches is not None:
        raise ValueError("attention_mask is not taken with caches: padded prompts decode through generate "
                         "(per-row cache positions); pass attention_mask without caches")
    if mask.dtype != torch.bool and not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return mask.bool()


def _projection_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the Linear layers produce from `dtype` inputs on `device`: torch.autocast's when
    it is on there (q, k and v then come out in it), else `dtype` itself."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


def _check_logits_at(logits_at, input_ids: Tensor, labels) -> None:
    b, t = input_ids.shape
    if labels is not None:
        raise ValueError("logits_at is for inference: with labels the loss needs every position's logits")
    if not isinstance(logits_at, Tensor) or logits_at.dtype not in (torch.int64, torch.int32) \
            or tuple(logits_at.shape) != (b,):
        raise ValueError(f"logits_at must be an int64 or int32 tensor of shape (batch,) = ({b},), got "
                         + (f"{logits_at.dtype} {tuple(logits_at.shape)}" if isinstance(logits_at, Tensor)
                            else type(logits_at).__name__))
    if logits_at.device != input_ids.device:
        raise ValueError(f"logits_at must be on input_ids' device {input_ids.device}, got {logits_at.device}")
    if logits_at.device.type == "cpu" and b and not torch.compiler.is_compiling() \
            and (int(logits_at.min()) < 0 or int(logits_at.max()) >= t):
        raise ValueError(f"logits_at must hold positions in [0, seqlen={t}), got values in "
                         f"[{int(logits_at.min())}, {int(logits_at.max())}]")


class Linear(nn.Linear):
    """nn.Linear (same parameters, state-dict names and module hooks) whose forward is
    phi_kernels.linear: in inference with a few rows (a decoding step) that is a hand-written
    CPU GEMV, which torch's fp32 addmm is not; otherwise F.linear, autograd included."""

    def forward(self, x: Tensor) -> Tensor:
        return phi_kernels.linear(x, self.weight, self.bias)


class PhiAttention(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.cfg = cfg
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, h * d)
        self.k_proj = Linear(cfg.hidden_size, kvh * d)
        self.v_proj = Linear(cfg.hidden_size, kvh * d)
        self.dense = Linear(h * d, cfg.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0,
                cache: KVCache | None = None, cache_pos: int | Tensor = 0) -> Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        dropout = cfg.attention_dropout if self.training else 0.0
        if cu_seqlens is not None:  # document-aware: packed (B*T, nh, hd), positions restart per document
            q, k, v = (z.reshape(b * t, z.shape[2], z.shape[3]) for z in (q, k, v))
            q = phi_kernels.apply_rotary(q, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            k = phi_kernels.apply_rotary(k, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            y = phi_kernels.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                   dropout_p=dropout, causal=True)
        else:
            q = phi_kernels.apply_rotary(q, cos, sin, seqlen_offsets=cache_pos)
            k = phi_kernels.apply_rotary(k, cos, sin, seqlen_offsets=cache_pos)
            if cache is not None:
                # Decoding: k/v go into the cache at cache_pos (per row when a tensor), and each row
                # attends to its own filled prefix, bottom-right causal.
                y = phi_kernels.flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=cache_pos,
                                                        causal=True)
            else:
                y = phi_kernels.flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
        return self.dense(y.reshape(b, t, cfg.num_attention_heads * cfg.head_dim))


class PhiMLP(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg)
        self.mlp = PhiMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens=None, max_seqlen=0, cache=None,
                cache_pos=0) -> Tensor:
        h = self.input_layernorm(x)
        attn, mlp = self.self_attn(h, cos, sin, cu_seqlens, max_seqlen, cache, cache_pos), self.mlp(h)
        if self.training:  # (an identity in eval: two module calls saved per layer and decoding step)
            attn, mlp = self.resid_dropout(attn), self.resid_dropout(mlp)
        return x + attn + mlp


class PhiModel(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(PhiDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class PhiForCausalLM(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.config = cfg
        self.model = PhiModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.gradient_checkpointing = False
        self._rope_cache: dict = {}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def rope(self, length: int, device, dtype) -> tuple[Tensor, Tensor]:
        """cos/sin caches (length, rotary_dim/2), rebuilt only when longer ones are needed."""
        key = (device, dtype)
        cached = self._rope_cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            n = max(length, self.config.max_position_embeddings)
            cached = phi_kernels.rotary_cos_sin(n, self.config.rotary_dim, base=self.config.rope_theta,
                                                device=device, dtype=dtype)
            self._rope_cache[key] = cached
        return cached

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, *, attention_mask: Tensor | None = None,
                eos_token_id: int | None = None, caches: list[KVCache] | None = None, cache_pos: int | Tensor = 0,
                return_logits: bool = True, logits_at: Tensor | None = None) -> CausalLMOutput:
        """input_ids (B, T). labels like Hugging Face: aligned with input_ids, shifted here,
        -100 ignored. attention_mask (B, T) of 0/1 (bool or int): a padded batch, left or right
        (or anywhere): only the real tokens run, packed as variable-length sequences, each row's
        positions counting from its first real token, so a row's logits are what it gets alone;
        a padding position neither predicts nor is predicted, and its logits are lm_head(0).
        eos_token_id: document-aware attention (no attention across an EOS).
        caches (from new_caches) with cache_pos: the position of input_ids[:, 0], an int, or an
        int32 tensor (B,) when rows sit at different positions (batched decoding); inference only,
        without attention_mask (generate handles padded prompts with per-row cache positions).
        return_logits=False (with labels): the loss is fused with lm_head
        (phi_kernels.fused_linear_cross_entropy) and the (B, T, vocab) logits are never
        materialised; logits is None.
        logits_at: an integer tensor (B,) of positions: only the logits at input_ids[b,
        logits_at[b]] are computed, shape (B, 1, vocab) (a prefill needs only each prompt's last
        token's: the lm_head of the other positions would be wasted); not with labels."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seqlen) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
        b, t = input_ids.shape
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != input_ids.shape:
                raise ValueError(f"labels must be an int64 tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                                 + (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor)
                                    else type(labels).__name__))
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            # Eager CPU checks (free next to the forward; on a GPU they would cost a host sync, and
            # the embedding's and the loss's device-side asserts stand in): ids the embedding
            # cannot index, and labels F.cross_entropy would refuse, named here.
            vocab = self.config.vocab_size
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
                raise ValueError(f"input_ids must be in [0, vocab_size={vocab}), got values in "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
            if labels is not None:
                bad = (labels != -100) & ((labels < 0) | (labels >= vocab))
                if bool(bad.any()):
                    raise ValueError(f"labels must be in [0, vocab_size={vocab}) or -100 (ignored), got "
                                     f"{int(labels[bad][0])}")
        if attention_mask is not None:
            attention_mask = _check_attention_mask(attention_mask, input_ids, caches)
        if logits_at is not None:
            _check_logits_at(logits_at, input_ids, labels)
        if isinstance(cache_pos, Tensor):
            if caches is None:
                raise ValueError("cache_pos as a tensor (per-row positions) needs caches")
            if cache_pos.dtype != torch.int32 or tuple(cache_pos.shape) != (b,):
                raise ValueError(f"cache_pos must be an int or an int32 tensor of shape (batch,) = ({b},), got "
                                 f"{cache_pos.dtype} {tuple(cache_pos.shape)}")
            positions = caches[0].k.shape[1]  # no row goes past its cache
        elif not isinstance(cache_pos, int) or cache_pos < 0:
            raise ValueError(f"cache_pos must be a non-negative int or an int32 tensor (batch,), got {cache_pos!r}")
        else:
            positions = cache_pos + t
        x = self.model.embed_dropout(self.model.embed_tokens(input_ids))  # (B, T, C)
        # The rotary tables in q and k's dtype, as Hugging Face's Phi casts its cos/sin.
        cos, sin = self.rope(positions, x.device, _projection_dtype(x.device, x.dtype))
        rows, cu, max_len = (None, None, 0)
        if eos_token_id is not None and caches is not None:
            raise ValueError("eos_token_id (document-aware attention) is for training, not with caches")
        if eos_token_id is not None or attention_mask is not None:
            rows, cu, max_len = packed_layout(input_ids, attention_mask, eos_token_id)
        if rows is not None:
            x = x.reshape(b * t, -1)[rows][None]  # (1, N, C): the real tokens, packed
        for i, layer in enumerate(self.model.layers):
            cache = caches[i] if caches is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, cu, max_len, cache, cache_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu, max_len, cache, cache_pos)
        x = self.model.final_layernorm(x)
        targets = None
        if labels is not None:
            # Shift the labels, not the logits: position t predicts token t + 1 and the last
            # position is ignored (as is any padding, predicting or predicted).
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            if attention_mask is not None:
                real = attention_mask.bool()
                targets = targets.masked_fill(~(real & F.pad(real[:, 1:], (0, 1), value=False)), -100)
            targets = targets.reshape(-1)
        if labels is not None and not return_logits:
            hidden, kept = (x[0], targets[rows]) if rows is not None else (x.reshape(b * t, -1), targets)
            loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, self.lm_head.bias, kept)
            return CausalLMOutput(logits=None, loss=loss)
        if rows is not None:  # back to (B, T, C); padding positions hold 0
            x = x.new_zeros(b * t, x.shape[-1]).index_copy(0, rows, x[0]).view(b, t, -1)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at.long()].unsqueeze(1)  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if labels is not None:
            # logits stays a view (no copy of the (B, T, vocab) tensor, and no zero-filled gradient
            # for a slice of it in the backward).
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------ helpers

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """One KVCache per layer, in the dtype the projections produce k and v in: the weights'
        dtype, or torch.autocast's when it is on here (then decode under that same autocast)."""
        p = self.lm_head.weight
        cfg = self.config
        dtype = _projection_dtype(p.device, p.dtype)
        return [KVCache(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype, p.device)
                for _ in range(cfg.num_hidden_layers)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (forward + backward of every weight, N = parameters
        without the embedding table, which is a lookup) plus attention's 6 * L * T * C
        (QK^T and PV: 2 * 2 * T * C per token per layer forward, x3 with backward, causal
        halves it: 12 * L * T * C / 2)."""
        cfg = self.config
        n = self.num_params() - self.model.embed_tokens.weight.numel()
        return 6.0 * n + 6.0 * cfg.num_hidden_layers * seq_len * cfg.hidden_size

    def generate(self, input_ids: Tensor, *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: Tensor | None = None, seed: int | None = None) -> Tensor:
        """transformers' generate: (B, T) ids (padded as attention_mask says) -> (B, T + new),
        rows padded after their EOS. KV-cache batched decoding (phi_model.generate); see
        phi_model.generate.generate_like_transformers."""
        from phi_model.generate import generate_like_transformers

        return generate_like_transformers(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                          eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                          attention_mask=attention_mask, seed=seed)

    @classmethod
    def from_pretrained(cls, directory: str, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "PhiForCausalLM":
        from phi_model.checkpoint import load_pretrained

        return load_pretrained(cls, directory, dtype=dtype, device=device)

    def save_pretrained(self, directory: str, *, extra_files: dict[str, str] | None = None) -> None:
        """Atomic: see phi_model.checkpoint.save_pretrained."""
        from phi_model.checkpoint import save_pretrained

        save_pretrained(self, directory, extra_files=extra_files)
