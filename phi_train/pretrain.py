"""phi pretraining with DeepSpeed ZeRO under torchrun.

On this CPU machine (no arguments: prepares the embedded stdlib corpus, trains the tiny config
with ZeRO-2 on two processes, saves checkpoints and exports out/final):
    torchrun --nproc_per_node=2 train/pretrain.py
    python -m phi_model.generate --checkpoint out/final --prompt "def fibonacci(n):"
Resume from the newest checkpoint in out/:
    torchrun --nproc_per_node=2 train/pretrain.py --resume
phi-1.5 with the paper's recipe (lr 2e-4 constant, wd 0.1, betas 0.9/0.98, eps 1e-7, fp16, seq
2048, 2048 sequences per step at any GPU count, 150B tokens; train/config.py RECIPES). Plan it
first, here, without a GPU; then run it:
    python train/pretrain.py --model phi-1.5 --dry-run --world-size 8
    torchrun --nproc_per_node=8 train/pretrain.py --model phi-1.5 --data data/mycorpus
Many machines (the same command on each node; HOST is one of them, its torchrun hosts the rendezvous):
    torchrun --nnodes=16 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=phi15 train/pretrain.py --model phi-1.5 --data data/mycorpus
Every flag, with its default: python train/pretrain.py --help (--config FILE.json for a file of them).
"""
from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

if not torch.cuda.is_available():
    import logging

    # Named, so DeepSpeed does not warn on every rank that it "was unable to detect" a GPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's CPU accelerator imports torch.utils.cpp_extension, which warns that it found no
    # CUDA runtime: true, and nothing to act on in a CPU run.
    logging.getLogger("torch.utils.cpp_extension").addFilter(lambda r: "No CUDA runtime" not in r.getMessage())

from phi_train import checkpoint
from phi_train.config import deepspeed_config, parse_args, resolve_precision, validate
from phi_train.dry_run import GPU_PEAK_TFLOPS as PLANNED_PEAKS

GPU_PEAK_TFLOPS = {**PLANNED_PEAKS, "H200": 989.0}  # dense 16-bit, per GPU, matched in the device name

# ----------------------------------------------------------------------------- configuration
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
local_rank = int(os.environ.get("LOCAL_RANK", 0))
# Every flag is checked before any process group, data or model (a bad config fails fast, naming
# the flag), and batch / step counts are derived for this world size.
cfg = validate(parse_args(), world)
if importlib.util.find_spec("deepspeed") is None:  # before any file is written or data prepared
    sys.exit("train/pretrain.py needs DeepSpeed, which is not installed here: pip install 'phi-kernels[train]'")
if cfg.dry_run:
    from phi_train.dry_run import main as dry_run

    dry_run(cfg)
    sys.exit(0)
on_gpu = torch.cuda.is_available()
precision = resolve_precision(cfg, on_gpu)
ds_config = deepspeed_config(cfg, world, precision, on_gpu)

# ----------------------------------------------------------------------------- data (prepared once)
if not os.path.exists(os.path.join(cfg.data, "meta.json")):  # only the default --data (validate checked)
    data_abs = os.path.abspath(cfg.data)
    os.makedirs(os.path.dirname(data_abs), exist_ok=True)
    # The lock sits beside the directory: prepare() builds the directory elsewhere and swaps it in whole.
    with open(os.path.join(os.path.dirname(data_abs), f".{os.path.basename(data_abs)}.prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank prepares; the others wait, then find it done
        if not os.path.exists(os.path.join(cfg.data, "meta.json")):
            from phi_train.prepare_data import prepare

            print(f"[rank {rank}] preparing the embedded corpus (Python stdlib sources) into {cfg.data}", flush=True)
            # No meta.json: whatever is there is an unfinished earlier preparation of this default
            # directory; it is replaced whole.
            prepare(cfg.data, overwrite=True)
from phi_train.data import TokenLoader, read_meta  # noqa: E402

meta = read_meta(cfg.data)

# ----------------------------------------------------------------------------- the run's record
if rank == 0:
    from phi_model.atomic import atomic_write_text

    resolved = {**dataclasses.asdict(cfg), "world_size": world, "precision": precision}
    os.makedirs(cfg.out_dir, exist_ok=True)
    for name, obj in (("train_config.json", resolved), ("deepspeed_config.json", ds_config)):
        text = json.dumps(obj, indent=2)
        atomic_write_text(os.path.join(cfg.out_dir, name), text + "\n")
        print(f"{name} (saved in {cfg.out_dir}): {json.dumps(obj)}", flush=True)

# ----------------------------------------------------------------------------- distributed + model
import deepspeed  # noqa: E402  (imported late: its import is slow, and bad configs should fail first)
import torch.distributed as dist  # noqa: E402

from phi_kernels import FusedAdam  # noqa: E402
from phi_model import PhiForCausalLM  # noqa: E402
from phi_train.config import model_config  # noqa: E402


def _quiet_meaningless_library_messages() -> None:
    """Drops, each at its source and by its exact text, library messages that say nothing about
    this run; every other warning still shows."""
    import warnings

    from deepspeed.utils import logger as ds_logger

    # FusedAdam is DeepSpeed's client optimizer by design and tested with ZeRO (tests/test_adam_deepspeed.py).
    ds_logger.addFilter(lambda r: "untested optimizer" not in r.getMessage())
    # DeepSpeed's ZeRO-2 calls the deprecated name; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


_quiet_meaningless_library_messages()

deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
if on_gpu:
    torch.cuda.set_device(device)
torch.manual_seed(cfg.seed)
random.seed(cfg.seed)
np.random.seed(cfg.seed)


class CausalLMLoss(torch.nn.Module):
    """The model whose forward returns the loss tensor: what DeepSpeed's engine wraps. ZeRO-3
    gathers a module's parameters around its forward and backward through hooks on the tensors it
    returns; PhiForCausalLM returns a dataclass (no hook) and its fused loss reads lm_head's
    parameters outside lm_head's forward, so under ZeRO-3 they are registered as this module's
    external parameters, gathered for its forward and backward."""

    def __init__(self, lm: PhiForCausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
        return self.lm(input_ids, labels=input_ids, eos_token_id=eos_token_id, return_logits=not cfg.fused_loss).loss


base_cfg = model_config(cfg.model)
model_cfg = dataclasses.replace(base_cfg, vocab_size=max(base_cfg.vocab_size, meta["vocab_size"]),
                                eos_token_id=meta["eos_token_id"])
model = PhiForCausalLM(model_cfg)
model.gradient_checkpointing = cfg.gradient_checkpointing
loss_model = CausalLMLoss(model)
n_params = model.num_params()  # counted now: ZeRO-3 leaves each rank a partition of every parameter
flops_per_token = model.flops_per_token(cfg.seq_len)
if cfg.zero_stage == 3 and cfg.fused_loss:
    for p in model.lm_head.parameters():
        deepspeed.zero.register_external_parameter(loss_model, p)
# No weight decay on biases and LayerNorm weights (every 1-D parameter), as in the phi recipe.
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
# Offloaded, the optimizer steps DeepSpeed's fp32 partitions on the host: FusedAdam's CPU kernel.
backend = cfg.optimizer_backend or ("cpu" if cfg.offload_optimizer == "cpu" else None)
optimizer = FusedAdam([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, backend=backend)


def lr_factor(step: int) -> float:
    """Multiplier of cfg.lr at an optimizer step: linear warmup, then constant or cosine to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))) / cfg.lr


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
engine, _, _, scheduler = deepspeed.initialize(model=loss_model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
if cfg.offload_optimizer == "cpu" and not engine.zero_cpu_offload():
    raise SystemExit("--offload-optimizer cpu: DeepSpeed did not enable ZeRO-Offload for this configuration")
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
    return {"step": step, "loader": gather(train_loader.state_dict()), "rng": gather(rng),
            "config": dataclasses.asdict(cfg)}


def mean_over_ranks(total: torch.Tensor, count: int) -> float:
    """The mean over ranks of a per-rank sum of `count` losses: the one host read-back."""
    t = (total.detach().to(torch.float32) / count).reshape(1)
    dist.all_reduce(t)
    return t.item() / world


def loss_scale() -> float:
    """fp16's current dynamic loss scale (1.0 otherwise), from whichever optimizer DeepSpeed built."""
    if precision != "fp16":
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale"))


@torch.no_grad()
def evaluate() -> float:
    engine.eval()
    saved = val_loader.state_dict()
    val_loader.load_state_dict({"epoch": 0, "pos": 0})  # the same batches every time
    total = torch.zeros((), dtype=torch.float32, device=device)
    for _ in range(cfg.eval_batches):
        total += engine(val_loader.next_batch().to(device), eos).detach().float()
    val_loader.load_state_dict(saved)
    engine.train()
    return mean_over_ranks(total, cfg.eval_batches)


# ----------------------------------------------------------------------------- training loop
tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * world * cfg.seq_len
peak = cfg.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if on_gpu and k in torch.cuda.get_device_name()),
                               0.0)
metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
writer = None
if rank == 0:
    if not cfg.resume and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run's metrics and plot are its own (validate refused reused checkpoints)
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
    offload = (f"; optimizer offloaded to the host ({type(optimizer).__name__} backend {backend})"
               if cfg.offload_optimizer == "cpu" else "")
    print(f"model {cfg.model}: {n_params / 1e6:.1f}M params, vocab {model_cfg.vocab_size}; "
          f"{world} ranks x micro-batch {cfg.micro_batch_size} x accum {cfg.grad_accum} x seq {cfg.seq_len} = "
          f"{tokens_per_step} tokens/step, {cfg.max_steps} steps; {precision}, ZeRO-{cfg.zero_stage}{offload}; "
          f"{'fused' if cfg.fused_loss else 'unfused'} loss; MFU uses {flops_per_token / 1e6:.1f} MFLOP/token "
          "(6 N + 6 L T C)", flush=True)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
engine.train()
# Losses stay on the device until the log interval: reading one back (.item()) would wait for the
# GPU at every micro-step.
t_last, n_acc = time.perf_counter(), 0
loss_acc = torch.zeros((), dtype=torch.float32, device=device)
while step < cfg.max_steps:
    for _ in range(cfg.grad_accum):
        loss = engine(train_loader.next_batch().to(device), eos)
        engine.backward(loss)
        engine.step()
        loss_acc += loss.detach().float()
        n_acc += 1
    step += 1
    if rank == 0:
        bar.update(1)
    if step % cfg.log_interval == 0 or step == cfg.max_steps:
        train_loss = mean_over_ranks(loss_acc, n_acc)  # waits for the device, once per interval
        dt = time.perf_counter() - t_last
        tok_s = tokens_per_step * (step % cfg.log_interval or cfg.log_interval) / dt
        rec = {"step": step, "loss": train_loss, "lr": scheduler.get_last_lr()[0],
               "grad_norm": float(engine.get_global_grad_norm() or 0.0), "loss_scale": loss_scale(),
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
        t_last, n_acc = time.perf_counter(), 0
        loss_acc.zero_()
    if step % cfg.save_interval == 0 or step == cfg.max_steps:
        tag = checkpoint.save(engine, ckpt_dir, step, client_state(), cfg.keep_last)
        if rank == 0:
            bar.write(f"saved checkpoint {tag}")

# ----------------------------------------------------------------------------- export
if rank == 0:
    bar.close()
    writer.close()
final = os.path.join(cfg.out_dir, "final")
tokenizer = {"tokenizer.json": os.path.join(cfg.data, "tokenizer.json")}
# Atomic: the weights, config and tokenizer are written beside out/final and swapped in together
# (an earlier export stays loadable until then).
if cfg.zero_stage == 3:
    # ZeRO-3 holds 1/world of each parameter per rank: DeepSpeed gathers the full 16-bit (or fp32)
    # tensors on every rank for the duration of the block (collective: every rank enters it).
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            model.save_pretrained(final, extra_files=tokenizer)
elif rank == 0:
    model.save_pretrained(final, extra_files=tokenizer)  # stages 0-2 keep full parameters on every rank
if rank == 0:
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
