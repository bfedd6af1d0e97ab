"""Baseline for bench_train.py: the model, data, seed, optimizer settings and loss of
train/pretrain.py's defaults, trained with plain torch DDP + torch.optim.AdamW (fused) under
torchrun. argv: data steps micro seq fused|unfused. Prints tokens/s and the first step's loss as
JSON (the first loss equals pretrain.py's: same seed, same weights, same batch)."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from phi_model import PhiConfig, PhiForCausalLM  # noqa: E402
from phi_train.config import TrainConfig  # noqa: E402
from phi_train.data import TokenLoader  # noqa: E402


def main(data: str, steps: int, micro: int, seq: int, loss_kind: str) -> None:
    if loss_kind not in ("fused", "unfused"):
        raise SystemExit(f"loss kind must be fused or unfused, got {loss_kind!r}")
    d = TrainConfig()  # pretrain.py's defaults: seed, lr, betas, eps, weight decay, clipping
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = json.load(open(os.path.join(data, "meta.json")))
    torch.manual_seed(d.seed)
    base = PhiConfig.from_name("tiny")
    model = PhiForCausalLM(PhiConfig.from_name("tiny", vocab_size=max(base.vocab_size, meta["vocab_size"]),
                                               eos_token_id=meta["eos_token_id"]))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": d.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=d.lr, betas=(d.beta1, d.beta2), eps=d.eps, fused=True)
    loader = TokenLoader(data, "train", seq, micro, rank, world, d.seed)
    times, first_loss = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        x = loader.next_batch()
        loss = ddp(x, labels=x, return_logits=loss_kind == "unfused").loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if first_loss is None:
            t = loss.detach().clone()
            dist.all_reduce(t)
            first_loss = t.item() / world
    dt = sorted(times[2:])[len(times[2:]) // 2]
    if rank == 0:
        print("RESULT " + json.dumps({"tokens_per_s": micro * seq * world / dt, "first_loss": first_loss}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
