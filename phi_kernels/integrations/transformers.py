"""phi_kernels inside Hugging Face transformers (5.x), in Liger-Kernel's style.

    import phi_kernels.integrations.transformers            # registers attn_implementation="phi_kernels"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="phi_kernels")

    from phi_kernels.integrations.transformers import apply_phi_kernels_to_llama
    apply_phi_kernels_to_llama()                     # classes: every Llama / Mistral / Qwen2 made from now on
    apply_phi_kernels_to_llama(model=model)          # or one instance

    trainer = Trainer(model, args, train_dataset=ds,  # FusedAdam with Trainer's decay / no-decay groups
                      optimizer_cls_and_kwargs=(FusedAdam, dict(lr=args.learning_rate)))

What `apply_phi_kernels_to_<family>` swaps, each switchable:
  rotary      the family's apply_rotary_pos_emb -> phi_kernels.apply_rotary (module-wide: rotary is
              a function of the modeling module, not a layer, so `model=` cannot narrow it; it
              takes the model's own cos / sin, so any rope scaling and position_ids carry over)
  attention   attn_implementation "phi_kernels" (see _hf_attention.py: padding masks become
              variable-length sequences; causal, GQA, sliding window and softcap as the model
              passes them). Classes: it becomes the default when none is requested; an explicit
              attn_implementation still wins. Instance: set on that model.
  fused_linear_cross_entropy
              the *ForCausalLM forward computes the loss straight from the hidden states
              (phi_kernels.fused_linear_cross_entropy) when labels are given in training (or with
              skip_logits=True); logits is then None. Evaluation and generation keep the logits.
Families: "phi" (transformers' PhiForCausalLM: partial rotary) and "llama" (Llama, Mistral,
Qwen2: full rotary, GQA; Mistral's and Qwen2's sliding windows). revert_phi_kernels_patches()
undoes every class and module patch (instance patches go with their instance).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import AttentionInterface

from phi_kernels.adam import FusedAdam
from phi_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy as _fused_loss
from phi_kernels.integrations._hf_attention import phi_kernels_attention_forward, phi_kernels_mask
from phi_kernels.rotary import apply_rotary

ATTN_IMPLEMENTATION = "phi_kernels"
_MARK = "__phi_kernels_patch__"

# family -> (modeling module, *ForCausalLM class, *PreTrainedModel class) of each architecture
FAMILIES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "phi": (("transformers.models.phi.modeling_phi", "PhiForCausalLM", "PhiPreTrainedModel"),),
    "llama": (("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "LlamaPreTrainedModel"),
              ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM", "MistralPreTrainedModel"),
              ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2PreTrainedModel")),
}

__all__ = ["ATTN_IMPLEMENTATION", "FusedAdam", "apply_phi_kernels_to_llama", "apply_phi_kernels_to_phi",
           "register_phi_kernels_attention", "revert_phi_kernels_patches", "rotary_pos_emb"]


def register_phi_kernels_attention() -> None:
    """Registers "phi_kernels" in AttentionInterface and AttentionMaskInterface (both are needed:
    an implementation missing from the mask interface is given no mask at all). Done on import."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, phi_kernels_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, phi_kernels_mask)


register_phi_kernels_attention()


# --------------------------------------------------------------------------- rotary


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> Tensor:
    if unsqueeze_dim not in (1, 2) or x.dim() != 4 or cos.dim() not in (2, 3) or cos.shape != sin.shape:
        raise ValueError(f"phi_kernels rotary takes q / k (batch, heads, seq, dim) with unsqueeze_dim=1 or "
                         f"(batch, seq, heads, dim) with 2, and cos / sin (seq, rot) or (batch, seq, rot); got x "
                         f"{tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, "
                         f"unsqueeze_dim={unsqueeze_dim}")
    xt = x.transpose(1, 2) if unsqueeze_dim == 1 else x  # (B, T, heads, D)
    b, t, h, d = xt.shape
    half = cos.shape[-1] // 2  # HF's cos is cat(freqs, freqs): the kernels take one half
    cos, sin = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
    if cos.dim() == 2 or cos.shape[0] == 1:  # one table for every row: positions 0..T-1 of it
        out = apply_rotary(xt, cos.reshape(-1, half), sin.reshape(-1, half))
    else:  # per-row positions (padding, packing): token n of the flattened batch reads row n
        out = apply_rotary(xt.reshape(1, b * t, h, d), cos.reshape(b * t, half),
                           sin.reshape(b * t, half)).view(b, t, h, d)
    return out.transpose(1, 2) if unsqueeze_dim == 1 else out


def rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Drop-in for transformers' apply_rotary_pos_emb (rotate_half convention) on
    phi_kernels.apply_rotary: q / k (B, H, T, D), cos / sin (B, T, rot) as the model's rotary
    embedding makes them; the first rot dims of each head rotate (Phi passes its rotary slice)."""
    return _rotate(q, cos, sin, unsqueeze_dim), _rotate(k, cos, sin, unsqueeze_dim)


setattr(rotary_pos_emb, _MARK, True)


# --------------------------------------------------------------------------- fused loss forward


def _output_cache_field() -> str:
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def fused_causal_lm_forward(original):
    """A *ForCausalLM forward that, given labels in training (or skip_logits=True), takes the loss
    from the hidden states with phi_kernels.fused_linear_cross_entropy and returns logits=None;
    otherwise it is `original`. Same loss as transformers' ForCausalLMLoss: labels shifted here
    (or shift_labels given), ignore_index -100, mean over the counted labels, or the sum over
    num_items_in_batch when the Trainer passes it."""
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    cache_field = _output_cache_field()

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        skip_logits = kwargs.pop("skip_logits", None)
        bound = signature.bind(self, *args, **kwargs).arguments
        labels = bound.get("labels")
        fused = labels is not None and (self.training if skip_logits is None else bool(skip_logits))
        if not fused:
            return original(self, *args, **kwargs)
        extra = dict(bound.pop(var_kw, {}) if var_kw else {})
        num_items = extra.pop("num_items_in_batch", None)
        shift_labels = extra.pop("shift_labels", None)
        ignore_index = extra.pop("ignore_index", -100)
        return_dict = extra.pop("return_dict", None)
        keep = bound.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise ValueError(f"logits_to_keep={keep!r} with the fused loss: the loss needs every position "
                             "(pass skip_logits=False to compute logits and loss the usual way)")
        inputs = {n: v for n, v in bound.items() if n not in ("self", "labels")}
        outputs = self.model(**inputs, **extra)
        hidden = outputs[0]  # (B, T, C)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # position t predicts t + 1
        targets = shift_labels.reshape(-1).to(hidden.device)
        head = self.lm_head
        loss = _fused_loss(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets,
                           ignore_index=ignore_index, reduction="mean" if num_items is None else "sum")
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if isinstance(num_items, Tensor) else num_items)
        out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                     attentions=getattr(outputs, "attentions", None),
                                     **{cache_field: getattr(outputs, cache_field, None)})
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    setattr(forward, _MARK, True)
    return forward


# --------------------------------------------------------------------------- patching


_ABSENT = object()
_UNDO: list[tuple[object, str, object]] = []  # (owner, attribute, its own original or _ABSENT), in patch order


def _set(owner, name: str, value) -> None:
    """owner.name = value for a class or a module, remembering what owner itself held (a class
    may inherit the attribute: then reverting deletes ours). Patching twice keeps the first."""
    current = vars(owner).get(name, _ABSENT)
    if getattr(current, _MARK, False):
        return
    _UNDO.append((owner, name, current))
    setattr(owner, name, value)


def revert_phi_kernels_patches() -> None:
    """Undo every class and module patch of apply_phi_kernels_to_* (latest first). The
    "phi_kernels" attention stays registered (it changes nothing unless asked for)."""
    while _UNDO:
        owner, name, original = _UNDO.pop()
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def _default_to_phi_kernels(original):
    """get_correct_attn_implementation that picks "phi_kernels" when nothing was requested."""
    @functools.wraps(original)
    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        return original(self, ATTN_IMPLEMENTATION if requested_attention is None else requested_attention,
                        is_init_check)

    setattr(get_correct_attn_implementation, _MARK, True)
    return get_correct_attn_implementation


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _apply(family: str, model, rotary: bool, attention: bool, fused_linear_cross_entropy: bool) -> None:
    _check_flags(rotary=rotary, attention=attention, fused_linear_cross_entropy=fused_linear_cross_entropy)
    archs = [(importlib.import_module(m), lm, base) for m, lm, base in FAMILIES[family]]
    if model is not None:  # validate, then act: nothing is patched for a model of another family
        if hasattr(model, "get_base_model"):  # a PEFT wrapper: patch the model inside
            model = model.get_base_model()
        arch = next((a for a in archs if isinstance(model, getattr(a[0], a[2]))), None)
        if arch is None:
            known = ", ".join(getattr(m, lm).__name__ for m, lm, _ in archs)
            raise TypeError(f"apply_phi_kernels_to_{family}(model=...) takes a model of the {family} family "
                            f"({known} or their base models), got {type(model).__name__}")
        if fused_linear_cross_entropy and not isinstance(model, getattr(arch[0], arch[1])):
            raise TypeError(f"fused_linear_cross_entropy=True needs a {arch[1]} (it replaces the lm_head + loss), "
                            f"got {type(model).__name__}: pass fused_linear_cross_entropy=False")
        archs = [arch]
    for module, lm_name, base_name in archs:
        if rotary:
            _set(module, "apply_rotary_pos_emb", rotary_pos_emb)
        if model is None:
            if attention:
                base = getattr(module, base_name)
                _set(base, "get_correct_attn_implementation",
                     _default_to_phi_kernels(base.get_correct_attn_implementation))
            if fused_linear_cross_entropy:
                lm = getattr(module, lm_name)
                _set(lm, "forward", fused_causal_lm_forward(lm.forward))
    if model is not None:
        if attention:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if fused_linear_cross_entropy and not getattr(model.forward, _MARK, False):
            model.forward = MethodType(fused_causal_lm_forward(type(model).forward), model)


def apply_phi_kernels_to_phi(model=None, rotary: bool = True, attention: bool = True,
                             fused_linear_cross_entropy: bool = True) -> None:
    """phi_kernels in transformers' Phi (PhiForCausalLM: partial rotary, parallel block): the
    classes (model=None: every model created afterwards) or one instance. See the module doc."""
    _apply("phi", model, rotary, attention, fused_linear_cross_entropy)


def apply_phi_kernels_to_llama(model=None, rotary: bool = True, attention: bool = True,
                               fused_linear_cross_entropy: bool = True) -> None:
    """phi_kernels in the Llama family: Llama, Mistral and Qwen2 (full rotary, GQA, sliding
    windows): every class of the three (model=None) or one instance of any of them."""
    _apply("llama", model, rotary, attention, fused_linear_cross_entropy)
