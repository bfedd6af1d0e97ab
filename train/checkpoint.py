"""Atomic checkpoints on top of DeepSpeed's save_checkpoint / load_checkpoint.

Layout: <dir>/step_000100/ (DeepSpeed's files from every rank, plus COMPLETE) and <dir>/latest
(the tag of the newest complete checkpoint). A save writes the new tag directory on all ranks,
waits for all of them, marks it COMPLETE, and only then replaces `latest` with an atomic
rename: a crash at any point leaves `latest` naming the previous complete checkpoint. Older
complete checkpoints beyond keep_last are removed after the pointer moves.
"""
from __future__ import annotations

import os
import shutil

import torch.distributed as dist


def latest_tag(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.exists(os.path.join(ckpt_dir, tag, "COMPLETE")):
        raise RuntimeError(f"{path} names {tag}, which is not a complete checkpoint")
    return tag


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int) -> str:
    tag = f"step_{step:06d}"
    if dist.get_rank() == 0 and os.path.exists(os.path.join(ckpt_dir, tag)):
        shutil.rmtree(os.path.join(ckpt_dir, tag))  # an incomplete leftover of a crashed save
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shard is on disk
    if dist.get_rank() == 0:
        open(os.path.join(ckpt_dir, tag, "COMPLETE"), "w").close()
        tmp = os.path.join(ckpt_dir, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, "latest"))
        complete = sorted(d for d in os.listdir(ckpt_dir)
                          if d.startswith("step_") and os.path.exists(os.path.join(ckpt_dir, d, "COMPLETE")))
        for old in complete[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, ckpt_dir: str) -> dict | None:
    """Loads the newest complete checkpoint; returns its client state (None if there is none)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    return client_state
