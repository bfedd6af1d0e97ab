"""Token shards and the training loader.

Shard format (one file per shard, little-endian): a 32-byte header
    magic b"PHITOKS1" | uint32 version (1) | uint32 itemsize (2 = uint16, 4 = uint32) | uint64 n_tokens | 8 zero bytes
followed by n_tokens token ids. Documents are separated by the EOS id.

The loader cuts the concatenated tokens into non-overlapping windows of seq_len tokens, shuffles
the windows with (seed, epoch), and gives rank r of w the windows r, r + w, r + 2w, ... of that
order: ranks see distinct data, the order is a pure function of the seed, and the state
(epoch, position) resumes a run mid-epoch exactly.
"""
from __future__ import annotations

import glob
import os
import struct

import numpy as np
import torch

MAGIC = b"PHITOKS1"
HEADER = struct.Struct("<8sIIQ8x")


def write_shard(path: str, tokens: np.ndarray) -> None:
    """Writes one shard atomically (temporary name, fsync, rename): a shard either exists whole or
    not at all. tokens: 1-D integer ids in [0, 2**32)."""
    from phi_model.atomic import atomic_write

    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise ValueError(f"{path}: tokens must be a 1-D array of integer ids, got {tokens.dtype} shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**32):
        raise ValueError(f"{path}: token ids must be in [0, 2**32), got [{int(tokens.min())}, {int(tokens.max())}]")
    itemsize = 2 if tokens.max(initial=0) < 2**16 else 4
    data = tokens.astype(np.uint16 if itemsize == 2 else np.uint32)

    def write(f):
        f.write(HEADER.pack(MAGIC, 1, itemsize, len(data)))
        f.write(data.tobytes())

    atomic_write(path, write)


def read_shard(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ValueError(f"{path} is not a phi-kernels token shard ({size} bytes, shorter than the header)")
    magic, version, itemsize, n = HEADER.unpack(head)
    if magic != MAGIC or version != 1 or itemsize not in (2, 4):
        raise ValueError(f"{path} is not a phi-kernels token shard (magic {magic!r}, version {version})")
    if size != HEADER.size + n * itemsize:
        raise ValueError(f"{path}: truncated or padded shard: its header says {n} tokens ({HEADER.size + n * itemsize} "
                         f"bytes), the file has {size} bytes")
    if n == 0:
        return np.zeros(0, dtype=np.uint16 if itemsize == 2 else np.uint32)
    return np.memmap(path, dtype=np.uint16 if itemsize == 2 else np.uint32, mode="r", offset=HEADER.size, shape=(n,))


def shard_paths(data_dir: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))


def read_meta(data_dir: str) -> dict:
    """<data_dir>/meta.json, checked: every error names the file."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; {data_dir} is not a prepared data directory "
                                "(run train/prepare_data.py)")
    from phi_model.json_file import read_json_object

    meta = read_json_object(path)
    for key in ("vocab_size", "eos_token_id", "train_tokens", "val_tokens"):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{path}: field {key!r} expected an int >= 0, got {v!r}")
    return meta


def check_shards(data_dir: str, split: str, meta: dict) -> list[str]:
    """The split's shard paths, refused when they are not the ones meta.json describes (a stale
    shard from an earlier run, a missing one, a different token count)."""
    paths = shard_paths(data_dir, split)
    names = [os.path.basename(p) for p in paths]
    listed = (meta.get("shards") or {}).get(split)
    where = os.path.join(data_dir, "meta.json")
    if listed is not None and sorted(listed) != names:
        raise ValueError(f"{data_dir}: the {split} shards on disk {names} are not the ones {where} lists "
                         f"{sorted(listed)} (files from another run?): prepare the directory again with --overwrite")
    total = sum(len(read_shard(p)) for p in paths)
    if total != meta[f"{split}_tokens"]:
        raise ValueError(f"{data_dir}: the {split} shards hold {total} tokens but {where} says "
                         f"{meta[f'{split}_tokens']} (files from another run?): prepare the directory again with "
                         "--overwrite")
    return paths


class TokenLoader:
    """Batches of (micro_batch, seq_len) token windows for one rank."""

    def __init__(self, data_dir: str, split: str, seq_len: int, micro_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world", world)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
        meta = read_meta(data_dir)
        paths = check_shards(data_dir, split, meta)
        if not paths:
            raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir} (run train/prepare_data.py)")
        self.tokens = np.concatenate([read_shard(p) for p in paths]) if len(paths) > 1 else read_shard(paths[0])
        self.seq_len, self.micro_batch, self.rank, self.world, self.seed = seq_len, micro_batch, rank, world, seed
        self.n_windows = len(self.tokens) // seq_len
        self.per_rank = self.n_windows // world
        if self.per_rank < micro_batch:
            raise ValueError(f"{split} data has {self.n_windows} windows of {seq_len} tokens: too few for {world} "
                             f"ranks x micro-batch {micro_batch}; prepare more data or lower --seq-len")
        self.epoch, self.pos = 0, 0

    def _order(self) -> np.ndarray:
        if getattr(self, "_cached", (None,))[0] != self.epoch:
            self._cached = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows))
        return self._cached[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def next_batch(self) -> torch.Tensor:
        if self.pos + self.micro_batch > self.per_rank:
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order()
        idx = order[self.rank::self.world][self.pos:self.pos + self.micro_batch]
        self.pos += self.micro_batch
        rows = [self.tokens[i * self.seq_len:(i + 1) * self.seq_len] for i in idx]
        return torch.from_numpy(np.stack(rows).astype(np.int64))
