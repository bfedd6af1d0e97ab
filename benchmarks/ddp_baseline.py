"""Baseline for bench_train.py: the same tiny phi model and data as train/pretrain.py, trained
with plain torch DDP + torch.optim.AdamW (fused) under torchrun. Prints tokens/s as JSON."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_model import PhiConfig, PhiForCausalLM  # noqa: E402
from train.data import TokenLoader  # noqa: E402


def main(data: str, steps: int, micro: int, seq: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = json.load(open(os.path.join(data, "meta.json")))
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig.from_name("tiny", vocab_size=meta["vocab_size"]))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.98), eps=1e-7, fused=True)
    loader = TokenLoader(data, "train", seq, micro, rank, world, 0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = loader.next_batch()
        loss = ddp(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    dt = sorted(times[2:])[len(times[2:]) // 2]
    if rank == 0:
        print("RESULT " + json.dumps({"tokens_per_s": micro * seq * world / dt}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
