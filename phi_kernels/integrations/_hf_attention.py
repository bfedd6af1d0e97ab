"""phi_kernels' flash attention behind transformers' attention interface (the "phi_kernels"
entry of AttentionInterface and AttentionMaskInterface; registered by
phi_kernels.integrations.transformers).

Contract with transformers (5.x): the mask side (`phi_kernels_mask`) is called once per forward
by create_causal_mask / create_sliding_window_causal_mask / create_bidirectional_mask and
returns what flash_attention_2 gets: None (no padding) or the 2-D boolean padding mask
(batch, kv_len), never a dense (batch, 1, q_len, kv_len) one. It refuses a mask pattern the
kernels cannot express (chunked attention, block overlays for images, any custom or_mask /
and_mask function), naming it. The attention side (`phi_kernels_attention_forward`) gets
query (B, H, Tq, D) and key / value (B, Hkv, Tk, D) (Tk > Tq when decoding with a cache) and
returns (B, Tq, H, D):

    no mask                   flash_attn_func, causal aligned bottom-right (a KV cache's new
                              queries are its last positions), GQA as the kernels do it
    no mask, position_ids     sequences packed in a row (positions restart, as
    not consecutive           DataCollatorWithFlattening makes them): flash_attn_varlen_func
                              with one sequence per run of consecutive positions
    2-D padding mask          the real tokens are gathered (queries: the mask's last Tq
                              columns), flash_attn_varlen_func attends among each row's real
                              tokens only, and the padding rows of the output are 0. Left and
                              right padding alike; exact for any 0/1 mask without a window
                              (the kernel's causal order is the rows' order)
    anything else             a ValueError that says why (a 4-D or float mask, attention
                              sinks, output_attentions)

causal from `is_causal` (else the module's, else True; False when config.is_causal is False),
sliding_window w as window_size (w - 1, w - 1) like flash_attention_2, softcap, scaling,
dropout in training; under torch.autocast, q, k and v in the autocast dtype (as SDPA casts them
there). As for flash_attention_2, the window is the one the attention call passes
(sliding_window=...); the mask side only checks that the mask's pattern is one of the above. Varlen metadata costs one small host read-back per forward: it is kept
for the mask (or position_ids) tensor it came from and reused by every later layer.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from phi_kernels.flash_attn import flash_attn_func, flash_attn_varlen_func

# transformers' mask functions that the kernels can express (by __qualname__): causal or
# bidirectional, a sliding window (taken from the attention call's sliding_window), padding and
# packed sequences (taken from the 2-D mask and position_ids). and_masks is walked into.
_EXPRESSIBLE = {
    "causal_mask_function", "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask", "sliding_window_bidirectional_overlay.<locals>.inner_mask",
    "padding_mask_function.<locals>.inner_mask", "packed_sequence_mask_function.<locals>.inner_mask",
}
_WRAPPERS = {"and_masks.<locals>.and_mask": "mask_functions",
             "remap_positions_for_packed_sequence.<locals>.inner_mask": "mask_function"}


def check_mask_function(fn) -> None:
    """ValueError naming the first part of transformers' mask function `fn` that phi_kernels'
    attention cannot express."""
    name = getattr(fn, "__qualname__", repr(fn))
    if getattr(fn, "__module__", None) != "transformers.masking_utils":
        name = f"{getattr(fn, '__module__', '?')}.{name}"  # a user's function, whatever its name
    if name in _EXPRESSIBLE:
        return
    if name in _WRAPPERS:
        inner = inspect.getclosurevars(fn).nonlocals.get(_WRAPPERS[name])
        for part in inner if isinstance(inner, (tuple, list)) else (inner,):
            check_mask_function(part)
        return
    raise ValueError(f"attn_implementation='phi_kernels' cannot express the attention mask function {name} "
                     "(it takes causal, bidirectional, sliding-window, padding and packed-sequence masks): "
                     "use attn_implementation='sdpa' or 'eager' for this model")


def phi_kernels_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function=None, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """The AttentionMaskInterface side: None when nothing is padded, else the boolean padding
    mask's last kv_length columns (batch, kv_length), as for flash_attention_2."""
    if mask_function is not None:
        check_mask_function(mask_function)
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None  # no padding: plain causal attention, no varlen bookkeeping
    return attention_mask


# --------------------------------------------------------------------------- varlen plans


@dataclass(frozen=True)
class _VarlenPlan:
    """Where the real tokens are: rows of the flattened (B*Tq) queries and (B*Tk) keys
    (None: all of them, in order), and the packed sequences' boundaries."""
    q_rows: Tensor | None
    k_rows: Tensor | None
    cu_q: Tensor  # int32 (n + 1,)
    cu_k: Tensor
    max_q: int
    max_k: int


def _cu_seqlens(lengths: Tensor) -> Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _padding_plan(mask: Tensor, tq: int, tk: int, windowed: bool) -> _VarlenPlan:
    """From a 2-D padding mask (B, M): M == Tk normally; M < Tk with a static cache (its unfilled
    tail is not attended); M > Tk with a sliding-window cache (the mask's last Tk columns). The
    queries are the last Tq positions the mask covers. With a sliding window each row's real
    tokens must be one run (left or right padding): across a hole the kernels would count the
    window in real tokens and the mask in positions."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    if windowed:
        m = mask.to(torch.int8)
        runs = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]  # 0 -> 1 steps per row
        if bool((runs > 1).any()):
            raise ValueError("attn_implementation='phi_kernels' with a sliding window needs each row's real tokens "
                             "contiguous in attention_mask (left or right padding); this mask has holes")
    if mask.shape[1] > tk:
        mask = mask[:, -tk:]
    if mask.shape[1] < tq:
        raise ValueError(f"attention_mask covers {mask.shape[1]} positions, fewer than the {tq} queries")
    q_mask = mask[:, -tq:]  # (B, Tq)
    k_mask = F.pad(mask, (0, tk - mask.shape[1]), value=False)  # (B, Tk)
    q_len, k_len = q_mask.sum(1), k_mask.sum(1)
    # One read-back for both maxima (the kernels' grid sizes).
    max_q, max_k = torch.stack([q_len.max(), k_len.max()]).tolist()
    return _VarlenPlan(q_mask.flatten().nonzero().flatten(), k_mask.flatten().nonzero().flatten(),
                       _cu_seqlens(q_len), _cu_seqlens(k_len), max_q, max_k)


def _packed_plan(position_ids: Tensor, batch: int, t: int) -> _VarlenPlan | None:
    """Sequences packed into rows: a new one starts at every row start and wherever the
    position is not the previous one + 1. None when every row is one run (nothing packed)."""
    pos = position_ids.expand(batch, t)
    starts = torch.ones(batch, t, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = starts.flatten().nonzero().flatten()  # (n,)
    if first.numel() == batch:
        return None
    cu = torch.cat([first, first.new_tensor([batch * t])])
    lengths = cu[1:] - cu[:-1]
    cu = cu.to(torch.int32)
    longest = int(lengths.max())
    return _VarlenPlan(None, None, cu, cu, longest, longest)


class _PlanCache:
    """The last plan, for the tensor (mask or position_ids) it was computed from: every layer of
    one forward passes the same tensor object, so the read-back happens once."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._source: weakref.ref | None = None
        self._plan: _VarlenPlan | None = None

    def get(self, source: Tensor, key: tuple, make):
        if (self._source is not None and self._source() is source and self._key == key
                and not torch.compiler.is_compiling()):
            return self._plan
        plan = make()
        self._source, self._key, self._plan = weakref.ref(source), key, plan
        return plan


def _version(t: Tensor) -> int | None:
    """t's version counter (bumped by in-place writes); inference tensors have none."""
    try:
        return t._version
    except RuntimeError:
        return None


_PADDING_PLANS = _PlanCache()
_PACKED_PLANS = _PlanCache()


# --------------------------------------------------------------------------- attention


def _refuse_unsupported(query: Tensor, key: Tensor, value: Tensor, attention_mask, s_aux, kwargs) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True needs the attention probabilities, which "
                         "attn_implementation='phi_kernels' never materialises: use attn_implementation='eager'")
    if s_aux is not None:
        raise ValueError("attention sinks (s_aux) are not supported by attn_implementation='phi_kernels'")
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"attn_implementation='phi_kernels' needs one head_dim for query, key and value, got "
                         f"{query.shape[-1]}, {key.shape[-1]} and {value.shape[-1]}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(f"attn_implementation='phi_kernels' takes a 2-D padding attention_mask (batch, seqlen) of "
                         f"0/1 (it becomes variable-length sequences), got an attention mask of shape {shape}: "
                         "a prepared 4-D or custom mask cannot be expressed by the kernels, pass the 2-D padding "
                         "mask or use attn_implementation='sdpa'")


def phi_kernels_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                  attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                                  sliding_window: int | None = None, softcap: float | None = None,
                                  is_causal: bool | None = None, s_aux: Tensor | None = None,
                                  **kwargs) -> tuple[Tensor, None]:
    """The AttentionInterface side: query (B, H, Tq, D), key / value (B, Hkv, Tk, D) ->
    ((B, Tq, H, D), None). See the module docstring for what each mask becomes."""
    _refuse_unsupported(query, key, value, attention_mask, s_aux, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "is_causal", True) is False:
        causal = False
    b, _, tq, d = query.shape
    tk = key.shape[2]
    window = (sliding_window - 1, sliding_window - 1) if sliding_window is not None and tk > sliding_window \
        else (-1, -1)
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=bool(causal), window_size=window,
                   softcap=float(softcap or 0.0))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, heads, D)
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast transformers' rotary leaves q and k in fp32 while v comes from its
        # projection in the autocast dtype. The attention runs in the autocast dtype, as SDPA
        # does under autocast and transformers' flash_attention_2 path casts to.
        dtype = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    plan = None
    if attention_mask is not None:
        windowed = window != (-1, -1)
        plan = _PADDING_PLANS.get(attention_mask, (tuple(attention_mask.shape), _version(attention_mask), tq, tk,
                                                   windowed),
                                  lambda: _padding_plan(attention_mask, tq, tk, windowed))
    elif tq == tk and isinstance(kwargs.get("position_ids"), Tensor):
        pos = kwargs["position_ids"]
        if pos.dim() == 2 and pos.shape[1] == tq and pos.shape[0] in (1, b):
            plan = _PACKED_PLANS.get(pos, (tuple(pos.shape), _version(pos), b), lambda: _packed_plan(pos, b, tq))
    if plan is None:
        return flash_attn_func(q, k, v, **options), None
    q_flat, k_flat, v_flat = (x.reshape(b * x.shape[1], x.shape[2], d) for x in (q, k, v))  # (B*T, heads, D)
    if plan.q_rows is not None:
        q_flat = q_flat.index_select(0, plan.q_rows)
        k_flat, v_flat = k_flat.index_select(0, plan.k_rows), v_flat.index_select(0, plan.k_rows)
    out = flash_attn_varlen_func(q_flat, k_flat, v_flat, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, **options)
    if plan.q_rows is not None:  # padding rows of the output are 0
        out = out.new_zeros(b * tq, out.shape[1], d).index_copy(0, plan.q_rows, out)
    return out.view(b, tq, out.shape[1], d), None

