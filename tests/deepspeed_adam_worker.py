"""Worker for tests/test_adam_deepspeed.py, launched with torchrun --nproc_per_node=2.

Trains a small MLP for a few steps with DeepSpeed ZeRO stage 2 (fp32, gloo, CPU) using
either phi_kernels.FusedAdam or torch.optim.AdamW as the client optimizer, and prints the
per-step losses (rank 0) as one JSON line.
"""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from phi_kernels import FusedAdam


def main(which: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-7)
    opt = FusedAdam(groups, **kw) if which == "fused" else torch.optim.AdamW(groups, **kw)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)  # distinct data per rank, fixed across steps
    x = torch.randn(4, 32, generator=g)
    y = torch.randn(4, 8, generator=g)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / dist.get_world_size())
    if rank == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    # An explicit teardown: left to interpreter exit, gloo's threads occasionally abort the
    # process ("terminate called without an active exception", seen once in CI after a finished
    # run). Then leave without running static destructors: every rank got here, so the run is
    # complete; an exception anywhere above still exits non-zero.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
