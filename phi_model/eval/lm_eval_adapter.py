"""An lm-evaluation-harness model, registered as "phi_kernels": the paper's language benchmarks
(WinoGrande, ARC, BoolQ, PIQA, HellaSwag, OpenBookQA, SIQA, MMLU) scored with our kernels.

    python -m phi_model.evaluate --lm-eval --model phi_kernels --model_args pretrained=DIR \\
        --tasks winogrande,arc_easy --batch_size 16

or from Python (importing this module registers the model):

    import lm_eval, phi_model.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="phi_kernels", model_args="pretrained=DIR", tasks=[...])

DIR is loaded by phi_model.eval.loading: a Phi checkpoint runs on phi_model (our attention,
rotary and fused kernels); any other causal LM on transformers. Requests:
  * loglikelihood: (context, continuation) token pairs as lm-eval's own HFLM forms them (the
    TemplateLM base class does the encoding), scored in right-padded batches; identical model
    inputs, and inputs that are a prefix of another one, share one forward (with causal
    attention the logits of a prefix are the first rows of the longer input's), which covers
    multiple-choice tasks whose answers are one token;
  * loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length, batched the same way;
  * generate_until: greedy or sampled decoding through phi_model.generate (the KV-cache batched
    decoder), stopped at the request's `until` strings and EOS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import _add_special_kwargs, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from phi_model.eval.loading import load_causal_lm

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value) -> int:
    """lm-eval passes --batch_size as given: an int, "8", or "auto[:N]" (no auto-detection here:
    the default is used)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive int or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {value!r}")
    return n


@register_model("phi_kernels")
class PhiKernelsLM(TemplateLM):
    def __init__(self, pretrained: str, batch_size=DEFAULT_BATCH_SIZE, device: str | None = None,
                 dtype: str | None = None, add_bos_token: bool | None = None, max_length: int | None = None,
                 **_ignored) -> None:
        super().__init__()
        if dtype not in (None, "auto") and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        if max_length is not None and int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length!r}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's CLI asks for cuda:0 by default; like its HFLM, use the CPU when there is no GPU
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._batch = _batch_size(batch_size)
        self.lm = load_causal_lm(pretrained, device=device, dtype=_DTYPES.get(dtype), batch_size=self._batch)
        self.tokenizer = self.lm.tokenizer
        self.add_bos_token = add_bos_token if add_bos_token is None else str(add_bos_token).lower() == "true"
        self._max_length = int(max_length) if max_length is not None else self.lm.max_length
        self._device = torch.device(device)

    # ------------------------------------------------------------------ what lm-eval asks about

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.lm.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # as HFLM: BOS if the tokenizer has one, else EOS
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, **_add_special_kwargs(add_special_tokens, self.add_bos_token))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        per (key, context_ids, continuation_ids). Inputs longer than max_length + 1 keep their
        last max_length + 1 tokens, as HFLM does."""
        inputs, cont_lens = [], []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation must have 1 to max_length={self.max_length} tokens, "
                                 f"got {len(continuation)}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append(tuple(whole[:-1]))  # the model reads all but the last token
            cont_lens.append(len(continuation))
        # Rows to run: inputs that are not a prefix of another input (lexicographic order puts a
        # prefix right before the inputs that extend it, so scanning backwards finds its host).
        order = sorted(range(len(inputs)), key=lambda i: inputs[i])
        host = {}
        for pos in range(len(order) - 1, -1, -1):
            i = order[pos]
            if pos + 1 < len(order):
                nxt = host[order[pos + 1]]
                if inputs[nxt][:len(inputs[i])] == inputs[i]:
                    host[i] = nxt
                    continue
            host[i] = i
        served: dict[int, list[int]] = {}
        for i in range(len(inputs)):
            served.setdefault(host[i], []).append(i)
        rows = sorted(served, key=lambda i: -len(inputs[i]))  # longest first: a bad length fails early
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(rows), self.batch_size), disable=disable_tqdm, desc="phi_kernels loglikelihood"):
            batch = rows[start:start + self.batch_size]
            lengths = [len(inputs[h]) for h in batch]
            ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
            for r, h in enumerate(batch):
                ids[r, :lengths[r]] = torch.tensor(inputs[h])
            logits = self.lm.logits(ids.to(self.lm.device), lengths)  # (B, T, V) float32
            for r, h in enumerate(batch):
                logprobs = F.log_softmax(logits[r, :lengths[r]], dim=-1)  # (T_h, V)
                for i in served[h]:
                    n, k = len(inputs[i]), cont_lens[i]
                    lp = logprobs[n - k:n]  # the positions that predict the continuation tokens
                    target = torch.tensor(list(requests[i][2])[-k:], device=lp.device)
                    results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks): lm-eval's disjoint rolling windows of
        max_length tokens, all windows of all texts scored in batches."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop string, EOS or max_gen_toks; requests with
        the same generation settings are decoded together."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        out = [""] * len(requests)
        for members in tqdm(groups.values(), disable=disable_tqdm, desc="phi_kernels generate_until"):
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"generate_until: max_gen_toks {max_gen} must be below the model's max_length "
                                 f"{self.max_length}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            top_p = kwargs.get("top_p")
            contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in members]
            texts = self.lm.complete_ids(contexts, max_new_tokens=max_gen, stop=until, temperature=temperature,
                                         top_p=float(top_p) if top_p is not None and temperature > 0 else None,
                                         seed=kwargs.get("seed"))
            for i, text in zip(members, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
