"""Language-model loss, forward + backward: phi_kernels.fused_linear_cross_entropy against the
unfused F.linear + F.cross_entropy on fp32 logits (transformers' ForCausalLMLoss, what a Hugging
Face model does without the patch).

Work = tokens per second through lm_head + loss, backward included. Shapes: the tiny preset's
head (hidden 256, vocab 8192, 4 x 256 tokens) on the CPU, phi-1.5's (hidden 2048, vocab 51200,
4 x 2048 tokens, bf16) on a GPU. The fused op's other gain, memory (the (tokens, vocab) fp32
logits and their gradient are never allocated), is recorded beside as logits_bytes_avoided.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import bench, quick_mode
from phi_kernels import fused_linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
HIDDEN, VOCAB, TOKENS = (2048, 51200, 4 * 2048) if DEVICE == "cuda" else (256, 8192, 4 * 256)
if quick_mode():
    TOKENS //= 4


def _inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, device=DEVICE, dtype=DTYPE, generator=g) * HIDDEN**-0.5).requires_grad_()
    b = torch.zeros(VOCAB, device=DEVICE, dtype=DTYPE, requires_grad=True)
    t = torch.randint(0, VOCAB, (TOKENS,), device=DEVICE, generator=g)
    return h, w, b, t


GROUP = f"lm loss fwd+bwd t{TOKENS} c{HIDDEN} v{VOCAB} {str(DTYPE)[6:]}"


def _run(loss_fn, h, w, b, t):
    def fn():
        loss = loss_fn(h, w, b, t)
        torch.autograd.grad(loss, (h, w, b))

    return fn


@pytest.mark.parametrize("provider", ["phi_kernels fused", "unfused (transformers' ForCausalLMLoss)"])
def test_lm_loss(benchmark, provider):
    h, w, b, t = _inputs()
    ours = provider.startswith("phi_kernels")
    if ours:
        fn = _run(lambda h, w, b, t: fused_linear_cross_entropy(h, w, b, t), h, w, b, t)
    else:
        fn = _run(lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100), h, w, b, t)
    bench(benchmark, fn, group=GROUP, provider=provider, ours=ours, work=TOKENS, unit="tokens/s",
          shape=(TOKENS, HIDDEN, VOCAB), dtype=DTYPE, device=DEVICE,
          logits_bytes_avoided=(2 * TOKENS * VOCAB * 4) if ours else 0)
