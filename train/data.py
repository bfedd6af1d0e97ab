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
    itemsize = 2 if tokens.max(initial=0) < 2**16 else 4
    data = tokens.astype(np.uint16 if itemsize == 2 else np.uint32)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, itemsize, len(data)))
        f.write(data.tobytes())
    os.replace(tmp, path)  # a shard either exists whole or not at all


def read_shard(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        magic, version, itemsize, n = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC or version != 1 or itemsize not in (2, 4):
        raise ValueError(f"{path} is not a phi-kernels token shard (magic {magic!r}, version {version})")
    return np.memmap(path, dtype=np.uint16 if itemsize == 2 else np.uint32, mode="r", offset=HEADER.size, shape=(n,))


def shard_paths(data_dir: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))


class TokenLoader:
    """Batches of (micro_batch, seq_len) token windows for one rank."""

    def __init__(self, data_dir: str, split: str, seq_len: int, micro_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        paths = shard_paths(data_dir, split)
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
