"""phi pretraining with DeepSpeed ZeRO under torchrun.

On this CPU machine (no arguments: prepares the embedded stdlib corpus, trains the tiny config
with ZeRO-2 on two processes, saves checkpoints and exports out/final):
    torchrun --nproc_per_node=2 train/pretrain.py
    python -m phi_model.generate --checkpoint out/final --prompt "def fibonacci(n):"
Resume from the newest checkpoint in out/:
    torchrun --nproc_per_node=2 train/pretrain.py --resume
phi-1.5 on GPUs (the paper's recipe: lr 2e-4 constant, wd 0.1, betas 0.9/0.98, eps 1e-7, fp16,
seq 2048, global batch micro x accum x GPUs; set them to reach 2048 sequences):
    torchrun --nproc_per_node=8 train/pretrain.py --model phi-1.5 --data data/mycorpus --grad-accum 32
Many machines: torchrun --nnodes=N --node-rank=R --rdzv-endpoint=HOST:PORT --nproc_per_node=8 ...
Every flag: python train/pretrain.py --help (and --config FILE.json for a file of them).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import checkpoint  # noqa: E402
from train.config import TrainConfig, deepspeed_config, parse_args, resolve_precision, validate  # noqa: E402
from train.data import TokenLoader  # noqa: E402

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 (shared/ANCHORS.md)

# ----------------------------------------------------------------------------- configuration
cfg = parse_args()
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
local_rank = int(os.environ.get("LOCAL_RANK", 0))
validate(cfg, world)  # before any process group: a bad config fails fast, with what to change
on_gpu = torch.cuda.is_available()
precision = resolve_precision(cfg, on_gpu)

# ----------------------------------------------------------------------------- data (prepared once)
if not os.path.exists(os.path.join(cfg.data, "meta.json")):  # only the default --data (validate checked)
    data_abs = os.path.abspath(cfg.data)
    os.makedirs(os.path.dirname(data_abs), exist_ok=True)
    # The lock sits beside the directory: prepare() builds the directory elsewhere and swaps it in whole.
    with open(os.path.join(os.path.dirname(data_abs), f".{os.path.basename(data_abs)}.prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank prepares; the others wait, then find it done
        if not os.path.exists(os.path.join(cfg.data, "meta.json")):
            from train.prepare_data import prepare

            print(f"[rank {rank}] preparing the embedded corpus (Python stdlib sources) into {cfg.data}", flush=True)
            # No meta.json: whatever is there is an unfinished earlier preparation of this default
            # directory; it is replaced whole.
            prepare(cfg.data, overwrite=True)
from train.data import read_meta  # noqa: E402

meta = read_meta(cfg.data)

# ----------------------------------------------------------------------------- distributed + model
import deepspeed  # noqa: E402  (imported late: its import is slow, and bad configs should fail first)
import torch.distributed as dist  # noqa: E402

from phi_kernels import FusedAdam  # noqa: E402
from phi_model import PhiConfig, PhiForCausalLM  # noqa: E402

deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
if on_gpu:
    torch.cuda.set_device(device)
torch.manual_seed(cfg.seed)
random.seed(cfg.seed)
np.random.seed(cfg.seed)

model_cfg = PhiConfig.from_name(cfg.model) if not os.path.isfile(cfg.model) else PhiConfig.from_json(cfg.model)
model_cfg = dataclasses.replace(model_cfg, vocab_size=max(model_cfg.vocab_size, meta["vocab_size"]),
                                eos_token_id=meta["eos_token_id"])
model = PhiForCausalLM(model_cfg)
model.gradient_checkpointing = cfg.gradient_checkpointing
# No weight decay on biases and LayerNorm weights (every 1-D parameter), as in the phi recipe.
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = FusedAdam([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, backend=cfg.optimizer_backend)


def lr_factor(step: int) -> float:
    """Multiplier of cfg.lr at an optimizer step: linear warmup, then constant or cosine to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))) / cfg.lr


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg, world, precision))
train_loader = TokenLoader(cfg.data, "train", cfg.seq_len, cfg.micro_batch_size, rank, world, cfg.seed)
val_loader = TokenLoader(cfg.data, "val", cfg.seq_len, cfg.micro_batch_size, 0, 1, cfg.seed)
eos = model_cfg.eos_token_id if cfg.document_attention else None

# ----------------------------------------------------------------------------- resume
ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
step = 0
if cfg.resume:
    state = checkpoint.load(engine, ckpt_dir)
    if state is None:
        raise SystemExit(f"--resume: no complete checkpoint in {ckpt_dir}")
    step = state["step"]
    train_loader.load_state_dict(state["loader"][rank])
    torch.set_rng_state(state["rng"][rank]["torch"])
    np.random.set_state(state["rng"][rank]["numpy"])
    random.setstate(state["rng"][rank]["python"])
    if rank == 0:
        print(f"resumed from {checkpoint.latest_tag(ckpt_dir)} at step {step}", flush=True)


def gather(obj):
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def client_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    return {"step": step, "loader": gather(train_loader.state_dict()), "rng": gather(rng), "config": dataclasses.asdict(cfg)}


def mean_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


@torch.no_grad()
def evaluate() -> float:
    engine.eval()
    saved = val_loader.state_dict()
    val_loader.load_state_dict({"epoch": 0, "pos": 0})  # the same batches every time
    total = 0.0
    for _ in range(cfg.eval_batches):
        x = val_loader.next_batch().to(device)
        total += engine(x, labels=x, eos_token_id=eos, return_logits=False).loss.item()
    val_loader.load_state_dict(saved)
    engine.train()
    return mean_over_ranks(total / cfg.eval_batches)


# ----------------------------------------------------------------------------- training loop
tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * world * cfg.seq_len
flops_per_token = model.flops_per_token(cfg.seq_len)
peak = cfg.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if on_gpu and k in torch.cuda.get_device_name()),
                               0.0)
metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
writer = None
if rank == 0:
    os.makedirs(cfg.out_dir, exist_ok=True)
    if not cfg.resume and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run's metrics and plot are its own (validate refused reused checkpoints)
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
    print(f"model {cfg.model}: {model.num_params() / 1e6:.1f}M params, vocab {model_cfg.vocab_size}; "
          f"{world} ranks x micro-batch {cfg.micro_batch_size} x accum {cfg.grad_accum} x seq {cfg.seq_len} = "
          f"{tokens_per_step} tokens/step; {precision}, ZeRO-{cfg.zero_stage}; MFU uses "
          f"{flops_per_token / 1e6:.1f} MFLOP/token (6 N + 6 L T C)", flush=True)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
engine.train()
t_last, loss_acc, n_acc = time.perf_counter(), 0.0, 0
while step < cfg.max_steps:
    for _ in range(cfg.grad_accum):
        x = train_loader.next_batch().to(device)
        loss = engine(x, labels=x, eos_token_id=eos, return_logits=False).loss
        engine.backward(loss)
        engine.step()
        loss_acc += loss.item()
        n_acc += 1
    step += 1
    if rank == 0:
        bar.update(1)
    if step % cfg.log_interval == 0 or step == cfg.max_steps:
        dt = time.perf_counter() - t_last
        train_loss = mean_over_ranks(loss_acc / n_acc)
        tok_s = tokens_per_step * (step % cfg.log_interval or cfg.log_interval) / dt
        rec = {"step": step, "loss": train_loss, "lr": scheduler.get_last_lr()[0],
               "grad_norm": float(engine.get_global_grad_norm() or 0.0),
               "loss_scale": float(engine.optimizer.cur_scale) if precision == "fp16" else 1.0,
               "tokens_per_s": tok_s, "tflops_per_device": flops_per_token * tok_s / world / 1e12}
        if peak:
            rec["mfu"] = rec["tflops_per_device"] / peak
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            rec["eval_loss"] = evaluate()
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(k, v, step)
            bar.set_postfix(loss=f"{train_loss:.3f}", **({"eval": f"{rec['eval_loss']:.3f}"} if "eval_loss" in rec else {}))
            bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        t_last, loss_acc, n_acc = time.perf_counter(), 0.0, 0
    if step % cfg.save_interval == 0 or step == cfg.max_steps:
        tag = checkpoint.save(engine, ckpt_dir, step, client_state(), cfg.keep_last)
        if rank == 0:
            bar.write(f"saved checkpoint {tag}")

# ----------------------------------------------------------------------------- export
if rank == 0:
    bar.close()
    writer.close()
if cfg.zero_stage == 3:
    raise SystemExit("export with ZeRO-3 needs a gathered state dict: convert with DeepSpeed's zero_to_fp32.py")
if rank == 0:
    final = os.path.join(cfg.out_dir, "final")
    # ZeRO-2 keeps full parameters on every rank. Atomic: the weights, config and tokenizer are
    # written beside out/final and swapped in together (an earlier export stays loadable until then).
    model.save_pretrained(final, extra_files={"tokenizer.json": os.path.join(cfg.data, "tokenizer.json")})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        recs = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train")
    ev = [r for r in recs if "eval_loss" in r]
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"phi {cfg.model} pretraining")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(os.path.join(cfg.out_dir, "loss.png"), dpi=110)
    print(f"exported {final} (Hugging Face format + tokenizer.json); metrics {metrics_path}; plot "
          f"{os.path.join(cfg.out_dir, 'loss.png')}", flush=True)
dist.barrier()
# Tear the process group down before interpreter exit: left to static destructors, gloo's threads
# can abort the process ("terminate called without an active exception") after a finished run.
dist.destroy_process_group()
