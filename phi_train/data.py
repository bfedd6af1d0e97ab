"""Token shards and the training loader.

Shard format (one file per shard, little-endian): a 32-byte header
    magic b"PHITOKS1" | uint32 version (1) | uint32 itemsize (2 = uint16, 4 = uint32) | uint64 n_tokens | 8 zero bytes
followed by n_tokens token ids. Documents are separated by the EOS id.

The loader never loads the corpus: every shard stays a memory map (opened lazily, a few at a
time), and the split is one virtual stream of tokens, the shards in name order. Window w is the
tokens [w * seq_len, (w + 1) * seq_len) of that stream; its shard and offset come from a binary
search over the shards' start offsets (a window that straddles shards is stitched from both).
Each epoch visits the windows in the order of a seeded bijection of [0, n_windows) (a Feistel
network in mixed radix, `WindowPermutation`), computed for the few positions a batch needs: no O(windows) array
exists anywhere. Rank r of w takes the positions r, r + w, r + 2w, ... of that order: ranks see
distinct data, the order is a pure function of (seed, epoch), and the state (epoch, position)
resumes a run mid-epoch exactly.
"""
from __future__ import annotations

import glob
import importlib.util
import mmap
import os
import struct
import sys
from collections import OrderedDict
from types import ModuleType

import numpy as np

MAGIC = b"PHITOKS1"
HEADER = struct.Struct("<8sIIQ8x")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phi_model_module(name: str) -> ModuleType:
    """phi_model/<name>.py (atomic, json_file) without running phi_model/__init__, which imports
    torch and the kernels (~0.5 GB RSS and seconds): data preparation and its worker processes need
    only these two small stdlib-only modules. An already imported phi_model.<name> is reused."""
    full = f"phi_model.{name}"
    if full in sys.modules:
        return sys.modules[full]
    alias = f"_phi_model_{name}"
    if alias not in sys.modules:
        spec = importlib.util.spec_from_file_location(alias, os.path.join(_ROOT, "phi_model", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[alias] = module
    return sys.modules[alias]


def shard_header(itemsize: int, n_tokens: int) -> bytes:
    return HEADER.pack(MAGIC, 1, itemsize, n_tokens)


def write_shard(path: str, tokens: np.ndarray) -> None:
    """Writes one shard atomically (temporary name, fsync, rename): a shard either exists whole or
    not at all. tokens: 1-D integer ids in [0, 2**32)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise ValueError(f"{path}: tokens must be a 1-D array of integer ids, got {tokens.dtype} shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**32):
        raise ValueError(f"{path}: token ids must be in [0, 2**32), got [{int(tokens.min())}, {int(tokens.max())}]")
    itemsize = 2 if tokens.max(initial=0) < 2**16 else 4
    data = tokens.astype(np.uint16 if itemsize == 2 else np.uint32)

    def write(f):
        f.write(shard_header(itemsize, len(data)))
        f.write(data.tobytes())

    phi_model_module("atomic").atomic_write(path, write)


def read_shard_header(path: str) -> tuple[np.dtype, int]:
    """(dtype, n_tokens) of a shard, checked against the file's size; reads 32 bytes."""
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
    return np.dtype(np.uint16 if itemsize == 2 else np.uint32), n


def read_shard(path: str) -> np.ndarray:
    """The shard's tokens as a read-only memory map (nothing is read until used)."""
    dtype, n = read_shard_header(path)
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n,))


def map_shard_for_random_reads(path: str) -> np.ndarray:
    """The shard's tokens as a read-only memory map advised MADV_RANDOM: a training window is a few
    KiB at a random place, and the kernel's default read-ahead around each fault reads far more
    (measured on the 1 GB corpus's shards, page cache dropped, 100 batches of 8 x 2048 tokens =
    6.25 MiB of windows: 415 MiB read from disk without the advice, 6 MiB with it)."""
    dtype, n = read_shard_header(path)
    if n == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the descriptor
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, dtype=dtype, count=n, offset=HEADER.size)


def shard_paths(data_dir: str, split: str) -> list[str]:
    """The split's shards in number order (train_999.bin before train_1000.bin)."""
    return sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")), key=lambda p: (len(p), p))


def read_meta(data_dir: str) -> dict:
    """<data_dir>/meta.json, checked: every error names the file."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; {data_dir} is not a prepared data directory "
                                "(run train/prepare_data.py)")
    meta = phi_model_module("json_file").read_json_object(path)
    for key in ("vocab_size", "eos_token_id", "train_tokens", "val_tokens"):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{path}: field {key!r} expected an int >= 0, got {v!r}")
    return meta


def check_shards(data_dir: str, split: str, meta: dict) -> tuple[list[str], list[int]]:
    """The split's shard paths, in meta.json's order, and token counts (from the headers alone),
    refused when they are not the ones meta.json describes (a stale shard from an earlier run, a
    missing one, a different token count)."""
    paths = shard_paths(data_dir, split)
    names = [os.path.basename(p) for p in paths]
    listed = (meta.get("shards") or {}).get(split)
    where = os.path.join(data_dir, "meta.json")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
            raise ValueError(f"{where}: shards.{split} expected a list of file names, got {listed!r:.80}")
        if sorted(listed) != sorted(names):
            raise ValueError(f"{data_dir}: the {split} shards on disk {names} are not the ones {where} lists "
                             f"{sorted(listed)} (files from another run?): prepare the directory again with "
                             "--overwrite")
        paths = [os.path.join(data_dir, name) for name in listed]
    counts = [read_shard_header(p)[1] for p in paths]
    if sum(counts) != meta[f"{split}_tokens"]:
        raise ValueError(f"{data_dir}: the {split} shards hold {sum(counts)} tokens but {where} says "
                         f"{meta[f'{split}_tokens']} (files from another run?): prepare the directory again with "
                         "--overwrite")
    return paths, counts


# ----------------------------------------------------------------------------- the shuffled order

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective, well-avalanched mix of uint64 values (wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A seeded bijection of [0, n), evaluated pointwise: perm(positions) -> window indices.

    A Feistel network in mixed radix, as in format-preserving encryption (NIST FF1): a value x
    is the pair (a, b) = (x // B, x % B) in [0, A) x [0, B), with A = ceil(sqrt(n)) and
    B = ceil(n / A); rounds alternate a <- (a + F(b)) mod A and b <- (b + F(a)) mod B, each
    invertible whatever F is, so the whole is a bijection of [0, A * B). The few values that land
    in [n, A * B) (fewer than A, about sqrt(n) of them) are encrypted again ("cycle walking")
    until they fall in [0, n), which keeps it a bijection of [0, n). Round keys come from numpy's
    SeedSequence of (seed, epoch); F is splitmix64's finalizer. O(1) memory in n."""

    ROUNDS = 8

    def __init__(self, n: int, seed: int, epoch: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self.n = n
        a = max(1, int(np.ceil(np.sqrt(n))))
        self.A, self.B = np.uint64(a), np.uint64(-(-n // a))
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(self.ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        a, b = x // self.B, x % self.B
        for i, key in enumerate(self.keys):
            if i % 2 == 0:
                a = (a + _mix64(b ^ key) % self.A) % self.A
            else:
                b = (b + _mix64(a ^ key) % self.B) % self.B
        return a * self.B + b

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"positions must be in [0, {self.n}), got [{x.min()}, {x.max()}]")
        y = self._encrypt(x.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():
            y[out] = self._encrypt(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


# ----------------------------------------------------------------------------- the loader

class TokenLoader:
    """Batches of (micro_batch, seq_len) token windows for one rank."""

    OPEN_SHARDS = 16  # memory maps kept open (least recently used closed first): bounded file descriptors

    def __init__(self, data_dir: str, split: str, seq_len: int, micro_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world", world)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
        meta = read_meta(data_dir)
        paths, counts = check_shards(data_dir, split, meta)
        if not paths:
            raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir} (run train/prepare_data.py)")
        self.paths = paths
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # (n_shards + 1,) token offsets
        self.n_tokens = int(self.starts[-1])
        self.seq_len, self.micro_batch, self.rank, self.world, self.seed = seq_len, micro_batch, rank, world, seed
        self.n_windows = self.n_tokens // seq_len
        self.per_rank = self.n_windows // world
        if self.per_rank < micro_batch:
            raise ValueError(f"{split} data has {self.n_windows} windows of {seq_len} tokens: too few for {world} "
                             f"ranks x micro-batch {micro_batch}; prepare more data or lower --seq-len")
        self.epoch, self.pos = 0, 0
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._perm: WindowPermutation | None = None

    def _shard(self, k: int) -> np.ndarray:
        if k in self._maps:
            self._maps.move_to_end(k)
        else:
            self._maps[k] = map_shard_for_random_reads(self.paths[k])
            if len(self._maps) > self.OPEN_SHARDS:
                self._maps.popitem(last=False)
        return self._maps[k]

    def window(self, w: int) -> np.ndarray:
        """Tokens of window w, (seq_len,) int64, stitched across shard boundaries when needed."""
        start, end = w * self.seq_len, (w + 1) * self.seq_len
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < end:
            take = min(end, int(self.starts[k + 1])) - start
            if take > 0:
                offset = start - int(self.starts[k])
                pieces.append(self._shard(k)[offset:offset + take])
                start += take
            k += 1
        return np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else pieces[0].astype(np.int64)

    def order(self, positions: np.ndarray) -> np.ndarray:
        """Window indices at these positions of the current epoch's order."""
        if self._perm is None or self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = WindowPermutation(self.n_windows, self.seed, self.epoch), self.epoch
        return self._perm(positions)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def next_batch_indices(self) -> np.ndarray:
        """The window indices of the next batch (advances the state)."""
        if self.pos + self.micro_batch > self.per_rank:
            self.epoch, self.pos = self.epoch + 1, 0
        positions = self.rank + self.world * (self.pos + np.arange(self.micro_batch, dtype=np.int64))
        self.pos += self.micro_batch
        return self.order(positions)

    def next_batch(self):
        import torch  # here, not at the top: data preparation imports this module without torch

        return torch.from_numpy(np.stack([self.window(int(i)) for i in self.next_batch_indices()]))
