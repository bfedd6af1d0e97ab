"""train/data.py: the window permutation (a seeded bijection, deterministic), windows across shard
boundaries against a concatenation oracle, rank and epoch coverage, exact resume, and a loader
over a corpus far larger than RAM that allocates nothing proportional to it."""
from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from phi_train.data import HEADER, TokenLoader, WindowPermutation, shard_header, shard_paths, write_shard


def _data_dir(root, shard_sizes: list[int], seed: int = 0, val_tokens: int = 0) -> tuple[str, np.ndarray]:
    """A prepared directory with train shards of these sizes (random ids) and the tokens concatenated."""
    rng = np.random.default_rng(seed)
    d = str(root)
    os.makedirs(d, exist_ok=True)
    parts = [rng.integers(0, 50000, size=n) for n in shard_sizes]
    names = []
    for k, part in enumerate(parts):
        names.append(f"train_{k:03d}.bin")
        write_shard(os.path.join(d, names[-1]), part)
    write_shard(os.path.join(d, "val_000.bin"), rng.integers(0, 50000, size=val_tokens))
    meta = {"vocab_size": 50000, "eos_token_id": 0, "train_tokens": int(sum(shard_sizes)), "val_tokens": val_tokens,
            "shards": {"train": names, "val": ["val_000.bin"]}}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return d, np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- the permutation

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**63 - 1), epoch=st.integers(0, 1000))
def test_permutation_is_a_bijection_and_deterministic(n, seed, epoch):
    perm = WindowPermutation(n, seed, epoch)
    order = perm(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(WindowPermutation(n, seed, epoch)(np.arange(n)), order)  # a pure function of the seed
    picks = np.array([n - 1, 0, n // 2])
    assert np.array_equal(perm(picks), order[picks])  # pointwise = the whole order, indexed


def test_permutation_shuffles_and_depends_on_seed_and_epoch():
    n = 100_003
    base = WindowPermutation(n, 7, 0)(np.arange(n))
    for other in (WindowPermutation(n, 7, 1), WindowPermutation(n, 8, 0)):
        assert np.mean(other(np.arange(n)) == base) < 0.01
    positions = np.arange(n)
    assert abs(np.corrcoef(base, positions)[0, 1]) < 0.02  # no trace of the identity
    assert abs(np.corrcoef(base[:-1], base[1:])[0, 1]) < 0.02  # neighbours in the order are unrelated
    # Windows spread evenly: each tenth of the order holds about a tenth of every tenth of the data.
    counts = np.histogram2d(positions, base, bins=10)[0]
    assert counts.min() > 0.8 * n / 100 and counts.max() < 1.2 * n / 100


def test_permutation_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        WindowPermutation(0, 1)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 10\)"):
        WindowPermutation(10, 1)(np.array([10]))


# ----------------------------------------------------------------------------- windows and ranks

@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), seq_len=st.integers(1, 97))
def test_windows_match_the_concatenated_shards(tmp_path_factory, sizes, seq_len):
    if sum(sizes) < seq_len:
        sizes = sizes + [seq_len]
    d, tokens = _data_dir(tmp_path_factory.mktemp("w"), sizes)
    loader = TokenLoader(d, "train", seq_len, 1)
    assert loader.n_windows == len(tokens) // seq_len
    for w in range(loader.n_windows):  # straddling windows are stitched from every shard they touch
        assert np.array_equal(loader.window(w), tokens[w * seq_len:(w + 1) * seq_len])


def test_ranks_cover_each_window_once_per_epoch_and_resume_exactly(tmp_path):
    d, tokens = _data_dir(tmp_path, [1000, 7, 0, 2500, 613])
    seq, micro, world = 16, 3, 4
    loaders = [TokenLoader(d, "train", seq, micro, rank=r, world=world, seed=11) for r in range(world)]
    per_rank = loaders[0].per_rank
    steps = per_rank // micro
    seen = [np.concatenate([lo.next_batch_indices() for _ in range(steps)]) for lo in loaders]
    every = np.concatenate(seen)
    assert len(np.unique(every)) == len(every) == world * steps * micro  # distinct across ranks and steps
    assert every.max() < loaders[0].n_windows
    batch = loaders[1].next_batch()  # the next epoch: state rolls over
    assert loaders[1].state_dict() == {"epoch": 1, "pos": micro}
    assert batch.shape == (micro, seq) and str(batch.dtype) == "torch.int64"
    # Exact resume, mid-epoch and across the epoch boundary.
    a = TokenLoader(d, "train", seq, micro, rank=2, world=world, seed=11)
    for _ in range(steps - 2):
        a.next_batch()
    state = a.state_dict()
    expect = [a.next_batch() for _ in range(5)]
    b = TokenLoader(d, "train", seq, micro, rank=2, world=world, seed=11)
    b.load_state_dict(state)
    for e in expect:
        got = b.next_batch()
        assert (got == e).all()
    state = a.state_dict()
    indices = a.next_batch_indices()
    a.load_state_dict(state)
    for i, row in zip(indices, a.next_batch()):  # rows are the windows the indices name
        assert np.array_equal(row.numpy(), tokens[i * seq:(i + 1) * seq])


def test_shards_are_read_in_number_order(tmp_path):
    for k in (0, 2, 999, 1000, 10000, 1001, 1):
        (tmp_path / f"train_{k:03d}.bin").write_bytes(b"")
    assert [p.rsplit("_", 1)[1] for p in shard_paths(str(tmp_path), "train")] == \
        ["000.bin", "001.bin", "002.bin", "999.bin", "1000.bin", "1001.bin", "10000.bin"]


def test_open_memory_maps_are_bounded(tmp_path):
    d, _ = _data_dir(tmp_path, [50] * 40)
    loader = TokenLoader(d, "train", 8, 4)
    for _ in range(60):
        loader.next_batch()
    assert 0 < len(loader._maps) <= TokenLoader.OPEN_SHARDS


def _sparse_shard(path: str, n_tokens: int) -> None:
    """A valid uint16 shard of n_tokens zeros that occupies no disk blocks (a sparse file)."""
    with open(path, "wb") as f:
        f.write(shard_header(2, n_tokens))
        f.truncate(HEADER.size + 2 * n_tokens)


@pytest.mark.parametrize("shards", [1, 24])
def test_loader_allocates_nothing_proportional_to_the_corpus(tmp_path, shards):
    """24 x 2**30 tokens (48 GiB in sparse files; 25M windows of 1024): construction plus a few
    batches allocate (tracemalloc, numpy's buffers included) under 1 MiB in all, as for a 1-shard
    corpus; the concatenating loader needed 48 GiB, a per-rank permutation array 200 MB."""
    n = 2**30
    names = [f"train_{k:03d}.bin" for k in range(shards)]
    for name in names:
        _sparse_shard(str(tmp_path / name), n)
    write_shard(str(tmp_path / "val_000.bin"), np.zeros(0, dtype=np.int64))
    meta = {"vocab_size": 50000, "eos_token_id": 0, "train_tokens": shards * n, "val_tokens": 0,
            "shards": {"train": names, "val": ["val_000.bin"]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    tracemalloc.start()
    try:
        loader = TokenLoader(str(tmp_path), "train", 1024, 8, rank=3, world=8, seed=1)
        for _ in range(5):
            batch = loader.next_batch()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loader.n_windows == shards * n // 1024
    assert batch.shape == (8, 1024)
    assert peak < 1 << 20, f"{peak} bytes allocated for a {shards * n}-token corpus"
