"""`train/pretrain.py --dry-run`: the plan of a run, computed on this machine without a GPU, data
or a process group.

The model is built on the meta device (shapes only, no memory), so phi-1.5 plans in seconds on a
laptop. Printed: the resolved config and its DeepSpeed JSON, parameter counts, tokens per step,
steps for the token budget, per-GPU memory of parameters, gradients and optimizer states under
ZeRO 0-3 (with DeepSpeed's own estimators beside ours for stages 2 and 3), and the wall time at
--mfu on A100 and H100 peaks.

Memory of the model states (ZeRO paper, Rajbhandari et al. 2020, section 3; N parameters, W GPUs):
16-bit mixed precision keeps 2N bytes of 16-bit parameters, 2N of 16-bit gradients and 12N of
optimizer states (fp32 master weights, Adam's m and v); fp32 keeps 4N + 4N + 8N. Stage 1
partitions the optimizer states over W, stage 2 the gradients too, stage 3 the parameters too.
ZeRO-Offload moves the optimizer states to the host. Activations are not included (they depend
on the micro-batch, the sequence length and --gradient-checkpointing).
"""
from __future__ import annotations

import dataclasses
import json

import torch

from phi_train.config import TrainConfig, deepspeed_config, model_config, resolve_precision

# Dense 16-bit tensor-core peaks, TFLOP/s per GPU (A100 SXM; H100 SXM). MFU is measured against these.
GPU_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}
# Bytes per parameter of (parameters, gradients, optimizer states) by precision.
STATE_BYTES = {"fp16": (2, 2, 12), "bf16": (2, 2, 12), "fp32": (4, 4, 8)}
GPUS_PER_NODE = 8
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU (and on each GPU's share of the host, when offloaded) of one ZeRO stage."""
    stage: int
    params: float
    grads: float
    optimizer: float
    host_optimizer: float  # optimizer states offloaded to the host (ZeRO-Offload)
    deepspeed_gpu: float | None  # DeepSpeed's estimator, where it has one (stages 2 and 3)

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_memory(n_params: int, world: int, stage: int, precision: str,
                offload: bool) -> tuple[float, float, float, float]:
    """(params, grads, optimizer states on the GPU, optimizer states on the host), bytes per GPU."""
    p, g, o = STATE_BYTES[precision]
    params = p * n_params / (world if stage >= 3 else 1)
    grads = g * n_params / (world if stage >= 2 else 1)
    opt = o * n_params / (world if stage >= 1 else 1)
    if offload and stage >= 1:
        return params, grads, 0.0, opt
    return params, grads, opt, 0.0


def _nodes(world: int) -> tuple[int, int]:
    """(GPUs per node, nodes) for DeepSpeed's estimators: 8-GPU nodes when they fit."""
    return (GPUS_PER_NODE, world // GPUS_PER_NODE) if world % GPUS_PER_NODE == 0 else (world, 1)


def deepspeed_estimate(stage: int, n_params: int, largest_layer: int, world: int, offload: bool) -> float | None:
    """DeepSpeed's per-GPU model-states estimate (bytes) for stage 2 or 3; None for 0 and 1 (it
    has no estimator for them). Its estimators assume 16-bit mixed precision and add 4N bytes of
    fp32 gradients to our count."""
    per_node, nodes = _nodes(world)
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return float(estimate_zero2_model_states_mem_needs(n_params, per_node, nodes, cpu_offload=offload)[1])
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return float(estimate_zero3_model_states_mem_needs(n_params, largest_layer, per_node, nodes,
                                                           cpu_offload=offload, cpu_offload_params=False,
                                                           zero_init=True)[1])
    return None


def build_meta_model(cfg: TrainConfig):
    """The model of cfg on the meta device: real shapes, no storage."""
    from phi_model import PhiForCausalLM

    with torch.device("meta"):
        return PhiForCausalLM(model_config(cfg.model))


def plan(cfg: TrainConfig) -> dict:
    """Every figure --dry-run prints, for a config resolved (validate) for cfg.world_size GPUs."""
    world = cfg.world_size
    model = build_meta_model(cfg)
    precision = resolve_precision(cfg, on_gpu=True)  # a plan of the GPU run: the recipe's precision
    n_params = model.num_params()
    embedding = model.model.embed_tokens.weight.numel()
    lm_head = sum(p.numel() for p in model.lm_head.parameters())
    # ZeRO-3 gathers one module's parameters at a time: the largest (here the embedding or lm_head).
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    tokens_per_step = global_batch * cfg.seq_len
    tokens_total = tokens_per_step * cfg.max_steps
    flops_per_token = model.flops_per_token(cfg.seq_len)
    offload = cfg.offload_optimizer == "cpu"
    stages = []
    for stage in range(4):
        params, grads, opt, host = zero_memory(n_params, world, stage, precision, offload)
        stages.append(StageMemory(stage, params, grads, opt, host,
                                  deepspeed_estimate(stage, n_params, largest, world, offload)))
    wall = {gpu: flops_per_token * tokens_total / (world * peak * 1e12 * cfg.mfu)
            for gpu, peak in GPU_PEAK_TFLOPS.items()}
    return {"config": dataclasses.asdict(cfg), "deepspeed": deepspeed_config(cfg, world, precision),
            "world_size": world, "precision": precision, "params": n_params, "embedding_params": embedding,
            "lm_head_params": lm_head, "non_embedding_params": n_params - embedding, "largest_layer_params": largest,
            "global_batch": global_batch, "tokens_per_step": tokens_per_step, "max_steps": cfg.max_steps,
            "tokens_total": tokens_total, "flops_per_token": flops_per_token, "stages": stages,
            "wall_seconds": wall, "mfu": cfg.mfu}


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def render(p: dict) -> str:
    cfg = p["config"]
    budget = f"--tokens {cfg['tokens']:.4g}" if cfg["tokens"] is not None else "--max-steps"
    lines = [
        f"dry run: {cfg['model']} on {p['world_size']} GPUs, {p['precision']}, ZeRO-{cfg['zero_stage']}"
        + (", optimizer offloaded to the host" if cfg["offload_optimizer"] == "cpu" else ""),
        f"optimizer         AdamW lr {cfg['lr']:g} ({cfg['schedule']}, warmup {cfg['warmup_steps']}), betas "
        f"({cfg['beta1']:g}, {cfg['beta2']:g}), eps {cfg['eps']:g}, weight decay {cfg['weight_decay']:g}, clip "
        f"{cfg['grad_clip']:g}; seq {cfg['seq_len']}",
        f"parameters        {p['params']:,} ({p['params'] / 1e9:.3f}B; embedding {p['embedding_params']:,}, "
        f"lm_head {p['lm_head_params']:,}, non-embedding {p['non_embedding_params']:,})",
        f"batch             {cfg['micro_batch_size']} micro x {cfg['grad_accum']} accum x {p['world_size']} GPUs = "
        f"{p['global_batch']} sequences of {cfg['seq_len']} tokens",
        f"tokens per step   {p['tokens_per_step']:,}",
        f"steps             {p['max_steps']:,} ({budget}; {p['tokens_total']:,} tokens trained)",
        f"training FLOPs    {p['flops_per_token'] / 1e9:.3f} GFLOP/token (6 N + 6 L T C), "
        f"{p['flops_per_token'] * p['tokens_total']:.3e} in all",
        "",
        "model states per GPU, GiB (activations not included)",
        "  ZeRO  params  grads  optimizer  GPU total  host (offload)  DeepSpeed estimate (GPU)",
    ]
    offload = cfg["offload_optimizer"] == "cpu"
    for s in p["stages"]:
        mark = " <" if s.stage == cfg["zero_stage"] else ""
        lines.append(f"  {s.stage:>4}  {_gib(s.params):>6}  {_gib(s.grads):>5}  {_gib(s.optimizer):>9}  "
                     f"{_gib(s.gpu_total):>9}  {_gib(s.host_optimizer if offload else None):>14}  "
                     f"{_gib(s.deepspeed_gpu):>24}{mark}")
    lines += ["  (DeepSpeed's estimators count 4 more bytes per parameter for fp32 gradients and have none for "
              "stages 0-1)", "", f"wall time at MFU {p['mfu']:.0%}"]
    for gpu, seconds in p["wall_seconds"].items():
        lines.append(f"  {gpu} ({GPU_PEAK_TFLOPS[gpu]:g} TFLOP/s peak): {seconds / 3600:,.1f} h = "
                     f"{seconds / 86400:,.2f} days, {seconds * p['world_size'] / 3600:,.0f} GPU-hours")
    return "\n".join(lines)


def main(cfg: TrainConfig) -> None:
    p = plan(cfg)
    print("resolved config:\n" + json.dumps(p["config"], indent=2))
    print("DeepSpeed config:\n" + json.dumps(p["deepspeed"], indent=2))
    print(render(p), flush=True)
