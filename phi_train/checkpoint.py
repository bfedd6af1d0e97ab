"""Atomic checkpoints on top of DeepSpeed's save_checkpoint / load_checkpoint.

Layout: <dir>/step_000100/ (DeepSpeed's files from every rank, plus COMPLETE) and <dir>/latest
(the tag of the newest complete checkpoint). A save writes the new tag directory on all ranks,
waits for all of them, marks it COMPLETE, and only then replaces `latest` with an atomic
rename: a crash at any point leaves `latest` naming the previous complete checkpoint. Every
rank fsyncs its files before the barrier, and COMPLETE and `latest` are written with a temporary
name, fsync and rename (phi_model.atomic), so after a power loss too COMPLETE implies the files
are on disk. Older complete checkpoints beyond keep_last are removed after the pointer moves,
never the one it names. (train/config.py's validate refuses a fresh run into an out dir that
holds another run's checkpoints, and --resume without one, before any process group.)
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
    from phi_model.atomic import atomic_write_bytes, atomic_write_text, fsync_dir, fsync_tree

    tag = f"step_{step:06d}"
    tag_dir = os.path.join(ckpt_dir, tag)
    if dist.get_rank() == 0 and os.path.exists(tag_dir):
        current = latest_tag(ckpt_dir) if os.path.exists(os.path.join(ckpt_dir, "latest")) else None
        if current == tag:  # never remove the checkpoint `latest` names before a new one is complete
            raise RuntimeError(f"{tag_dir} is the latest complete checkpoint; refusing to overwrite it")
        shutil.rmtree(tag_dir)  # an incomplete leftover of a crashed save
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    fsync_tree(tag_dir)  # this rank's files are on disk, not only in the page cache
    dist.barrier()  # every rank's shard is on disk
    if dist.get_rank() == 0:
        atomic_write_bytes(os.path.join(tag_dir, "COMPLETE"), b"")
        atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)  # temp name, fsync, rename, fsync dir
        fsync_dir(ckpt_dir)
        complete = sorted(d for d in os.listdir(ckpt_dir)
                          if d.startswith("step_") and os.path.exists(os.path.join(ckpt_dir, d, "COMPLETE")))
        for old in complete[:-keep_last]:
            if old != tag:  # the one `latest` now names stays, whatever the sort order says
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
