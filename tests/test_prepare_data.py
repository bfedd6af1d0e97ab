"""train/prepare_data.py: every input format against an independent oracle (the tokenizer's own
encode, document by document), exact-duplicate removal and its count, the split by document,
resume after an interruption (finished shards kept, the rest redone, the result byte-identical),
refusal and whole replacement of a used directory, the optional `datasets` source (missing and
faked), the progress bar, and peak RSS that does not grow with the corpus."""
from __future__ import annotations

import fcntl
import json
import os
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import phi_train.prepare_data as prep
from benchmarks.bench_data import measure_prepare, write_jsonl_corpus
from phi_train.data import read_shard

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _doc(i: int) -> str:
    return f"def f{i}(x):\n    return {' '.join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(i % 9 + 1))}\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    prep.train_tokenizer(iter([_doc(i) for i in range(200)] + ["é" * 50, "x" * 99]), 400).save(path)
    return path


def _tokens(out, split: str) -> np.ndarray:
    meta = json.load(open(os.path.join(out, "meta.json")))
    parts = [np.asarray(read_shard(os.path.join(out, n))) for n in meta["shards"][split]]
    return np.concatenate(parts).astype(np.int64)


def _expected(tokenizer: str, docs: list[str], val_every: int) -> tuple[list[int], list[int], int]:
    """The oracle: first occurrences kept, every val_every'th kept document to val, ids by
    Tokenizer.encode one document at a time, EOS after each."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    eos = tok.token_to_id(prep.EOS)
    seen, train, val = set(), [], []
    for d in docs:
        if d in seen:
            continue
        seen.add(d)
        (val if val_every and len(seen) % val_every == 0 else train).extend(tok.encode(d).ids + [eos])
    return train, val, len(docs) - len(seen)


def _corpus(root) -> tuple[str, list[str]]:
    """A folder with every format, duplicates within and across files, null/blank records, long
    text files cut into pieces, and a file of unknown type; and its documents in reading order."""
    d = root / "corpus"
    (d / "sub").mkdir(parents=True)
    rows = [{"text": _doc(i)} for i in range(40)] + [{"text": None}, {"text": " "}, {"text": _doc(3)}]
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    column = [_doc(i) for i in range(35, 70)] + [None, _doc(0)]
    pq.write_table(pa.table({"text": column, "n": list(range(len(column)))}), d / "b.parquet", row_group_size=7)
    (d / "sub" / "c.txt").write_text("".join(f"{i:098d}\n" for i in range(25)))  # 2500 bytes, lines of 99 + \n
    (d / "sub" / "d.md").write_text("é" * 700)  # 1400 bytes, no line break: cut before a character
    (d / "z.bin").write_bytes(b"\0")
    docs = [r["text"] for r in rows if r["text"] and r["text"].strip()] + [t for t in column if t]
    docs += ["".join(f"{i:098d}\n" for i in range(k, min(k + 10, 25))) for k in (0, 10, 20)]
    docs += ["é" * 500, "é" * 200]
    return str(d), docs


@pytest.mark.parametrize("workers", [0, 2])
def test_every_format_matches_the_oracle(tmp_path, tokenizer, workers):
    src, docs = _corpus(tmp_path)
    meta = prep.prepare(str(tmp_path / "out"), [src], tokenizer=tokenizer, val_every=4, shard_tokens=300,
                        max_document_bytes=1000, workers=workers, progress=False)
    train, val, dups = _expected(tokenizer, docs, 4)
    assert _tokens(tmp_path / "out", "train").tolist() == train
    assert _tokens(tmp_path / "out", "val").tolist() == val
    assert meta["duplicate_documents"] == dups == 7  # _doc(3) in a.jsonl; _doc(0), _doc(35..39) in b.parquet
    assert meta["documents"] == len(docs) - dups == meta["train_documents"] + meta["val_documents"]
    assert meta["val_documents"] == meta["documents"] // 4
    assert meta["skipped_documents"] == {"null": 2, "empty": 1} and meta["skipped_files"] == 1
    assert meta["train_tokens"] == len(train) and len(meta["shards"]["train"]) == -(-len(train) // 300)
    assert all(len(read_shard(str(tmp_path / "out" / n))) == 300 for n in meta["shards"]["train"][:-1])
    assert sorted(os.listdir(tmp_path)) == ["corpus", "out"], "no partial directory or lock left behind"


def test_split_is_by_document(tmp_path, tokenizer):
    src = tmp_path / "docs.jsonl"
    docs = [_doc(i) for i in range(90)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prep.prepare(str(tmp_path / "out"), [str(src)], tokenizer=tokenizer, val_every=5, shard_tokens=64,
                 progress=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    eos = tok.token_to_id(prep.EOS)
    decoded = {}
    for split in ("train", "val"):
        ids = _tokens(tmp_path / "out", split)
        decoded[split] = [tok.decode(d[:-1].tolist()) for d in np.split(ids, np.where(ids == eos)[0] + 1)[:-1]]
    assert decoded["val"] == docs[4::5]  # whole documents, across shard boundaries
    assert decoded["train"] == [d for i, d in enumerate(docs) if i % 5 != 4]


def test_resume_keeps_finished_shards_and_gives_the_same_result(tmp_path, tokenizer, monkeypatch, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _doc(i % 500)}) + "\n" for i in range(600)))
    kwargs = dict(tokenizer=tokenizer, val_every=7, shard_tokens=500, workers=2, progress=False)
    reference = prep.prepare(str(tmp_path / "ref"), [str(src)], **kwargs)
    kwargs["batch_bytes"] = 1500  # many batches, so several checkpoints (the result does not depend on it)
    checkpoints, appended = [], []
    real_checkpoint, real_append = prep._Run._checkpoint, prep.ShardWriter.append

    def checkpoint(self, p, writers):
        real_checkpoint(self, p, writers)
        checkpoints.append({s: w.shards for s, w in writers.items()})

    def append(self, tokens):
        if len(checkpoints) >= 2:
            appended.append(len(tokens))
            if len(appended) == 5:  # tokens past the checkpoint are in the partial files: resume truncates them
                raise KeyboardInterrupt
        return real_append(self, tokens)

    monkeypatch.setattr(prep._Run, "_checkpoint", checkpoint)
    monkeypatch.setattr(prep.ShardWriter, "append", append)
    out, staging = tmp_path / "out", tmp_path / ".out.prepare-partial"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(out), [str(src)], **kwargs)
    assert not out.exists() and staging.is_dir()
    done = checkpoints[-1]["train"]
    assert done >= 2
    kept = {n: os.stat(staging / f"train_{n:03d}.bin").st_ino for n in range(done)}
    monkeypatch.setattr(prep.ShardWriter, "append", real_append)
    closed = []
    real_close = prep.ShardWriter._close_shard
    monkeypatch.setattr(prep.ShardWriter, "_close_shard", lambda self: (closed.append(self.split), real_close(self)))
    capsys.readouterr()
    meta = prep.prepare(str(out), [str(src)], **kwargs)
    assert f"resuming {out}: {done} train" in capsys.readouterr().err
    assert closed.count("train") == len(reference["shards"]["train"]) - done  # finished shards were not redone
    assert {n: os.stat(out / f"train_{n:03d}.bin").st_ino for n in range(done)} == kept  # the same files, moved
    assert meta == reference | {"fingerprint": meta["fingerprint"]}
    for name in reference["shards"]["train"] + reference["shards"]["val"] + ["tokenizer.json"]:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not staging.exists()


def _die(*args):
    os._exit(3)  # a tokenizer worker killed (for memory, say)


def test_a_dead_worker_stops_the_run_resumably(tmp_path, tokenizer, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(50)))
    monkeypatch.setattr(prep, "_encode", _die)  # the forked workers inherit it
    with pytest.raises(BrokenProcessPool):
        prep.prepare(str(tmp_path / "out"), [str(src)], tokenizer=tokenizer, workers=2, progress=False)
    assert (tmp_path / ".out.prepare-partial" / "state.sqlite").exists() and not (tmp_path / "out").exists()


def test_used_directory_is_kept_refused_or_replaced_whole(tmp_path, tokenizer, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(120)))
    out = tmp_path / "out"
    kwargs = dict(tokenizer=tokenizer, shard_tokens=200, progress=False)
    first = prep.prepare(str(out), [str(src)], **kwargs)
    stamp = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    assert prep.prepare(str(out), [str(src)], **kwargs) == first  # the same run: nothing to do
    assert "already prepared" in capsys.readouterr().err
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == stamp
    for change in (dict(val_every=3), dict(shard_tokens=999), dict(dedup=False)):
        with pytest.raises(ValueError, match=r"--out .*not empty.*not prepared from these inputs.*--overwrite"):
            prep.prepare(str(out), [str(src)], **{**kwargs, **change})
    src.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(5)))  # the input changed
    with pytest.raises(ValueError, match="--overwrite"):
        prep.prepare(str(out), [str(src)], **kwargs)
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == stamp
    second = prep.prepare(str(out), [str(src)], **kwargs, overwrite=True)
    assert sorted(os.listdir(out)) == sorted(["meta.json", "tokenizer.json", "val_000.bin"]
                                             + second["shards"]["train"])  # no stale shard of the first run
    assert len(first["shards"]["train"]) > len(second["shards"]["train"])
    # Another run holding the lock: refused, nothing touched.
    with open(tmp_path / ".out.prepare-partial.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another prepare_data run is preparing it"):
            prep.prepare(str(out), [str(src)], **kwargs, val_every=2, overwrite=True)
    # A bad document late in the stream: the partial work is removed, <out> is as it was.
    stamp = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    src.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(100)) + '{"text": 5}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:101: field 'text' is int"):
        prep.prepare(str(out), [str(src)], **kwargs, overwrite=True)
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == stamp
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "out"]


def test_stale_partial_work_of_other_settings_is_discarded(tmp_path, tokenizer, monkeypatch, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(300)))
    real_checkpoint = prep._Run._checkpoint

    def interrupt(self, p, writers):
        real_checkpoint(self, p, writers)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep._Run, "_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(tmp_path / "out"), [str(src)], tokenizer=tokenizer, shard_tokens=300, batch_bytes=1000,
                     progress=False)
    monkeypatch.setattr(prep._Run, "_checkpoint", real_checkpoint)
    capsys.readouterr()
    meta = prep.prepare(str(tmp_path / "out"), [str(src)], tokenizer=tokenizer, shard_tokens=301, progress=False)
    assert "discarding" in capsys.readouterr().err
    ref = prep.prepare(str(tmp_path / "ref"), [str(src)], tokenizer=tokenizer, shard_tokens=301, progress=False)
    assert meta["shards"] == ref["shards"]
    for name in ref["shards"]["train"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_hf_dataset_needs_datasets_and_reads_it_as_a_stream(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as here: not installed
    with pytest.raises(ValueError, match=r"--hf-dataset user/corpus: needs the Hugging Face `datasets` package"):
        prep.prepare(str(tmp_path / "out"), hf_dataset="user/corpus", tokenizer=tokenizer)
    with pytest.raises(SystemExit) as e:
        prep.main(["--out", str(tmp_path / "out"), "--hf-dataset", "user/corpus"])
    assert e.value.code == 2 and not (tmp_path / "out").exists()

    rows = [{"text": _doc(i % 30)} for i in range(50)]
    calls = []

    class Stream:  # the part of datasets.IterableDataset that prepare uses
        def __init__(self, rows):
            self.rows = rows

        def skip(self, n):
            return Stream(self.rows[n:])

        def __iter__(self):
            return iter(self.rows)

    class Saved:  # a datasets.Dataset loaded from disk
        column_names = ["text"]

        def to_iterable_dataset(self):
            return Stream(rows)

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split, streaming: calls.append((name, config, split, streaming)) or \
        Stream(rows)
    fake.load_from_disk = lambda path: calls.append(("disk", path)) or Saved()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    train, val, dups = _expected(tokenizer, [r["text"] for r in rows], 6)
    meta = prep.prepare(str(tmp_path / "hub"), hf_dataset="user/corpus", hf_config="small", tokenizer=tokenizer,
                        val_every=6, progress=False)
    assert calls == [("user/corpus", "small", "train", True)]
    assert meta["duplicate_documents"] == dups == 20
    assert _tokens(tmp_path / "hub", "train").tolist() == train and _tokens(tmp_path / "hub", "val").tolist() == val
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    prep.prepare(str(tmp_path / "local"), hf_dataset=str(saved), tokenizer=tokenizer, val_every=6, progress=False)
    assert calls[-1] == ("disk", str(saved))
    assert _tokens(tmp_path / "local", "train").tolist() == train
    with pytest.raises(ValueError, match="give one source, not both"):
        prep.prepare(str(tmp_path / "x"), [str(saved)], hf_dataset="user/corpus")


def test_progress_bar_and_command_line(tmp_path, tokenizer, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(50)))
    prep.prepare(str(tmp_path / "a"), [str(src)], tokenizer=tokenizer, progress=True)
    err = capsys.readouterr().err
    assert "prepare_data" in err and "tok/s" in err and "dup=0" in err
    with pytest.raises(SystemExit) as e:
        prep.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--shard-tokens", "--workers", "--no-dedup", "--hf-dataset", "--tokenizer-sample-bytes",
                 "--max-document-bytes", "--overwrite"):
        assert flag in text
    assert "(default: 50000000)" in text
    for argv, match in ((["--shard-tokens", "0"], "--shard-tokens must be an int >= 1"),
                        (["--workers", "-1"], "--workers must be an int >= 0")):
        with pytest.raises(SystemExit):
            prep.main(["--out", str(tmp_path / "b"), "--input", str(src)] + argv)
        assert match in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_peak_rss_does_not_grow_with_the_corpus(tmp_path, tokenizer):
    """Peak RSS of the preparing process (VmHWM) and of its largest worker (getrusage
    RUSAGE_CHILDREN) for a 2 MB and a 10 MB corpus: the larger one adds under a quarter of its extra
    bytes (what does grow: SQLite's page cache of the digests, ~50 bytes a document, up to its
    32 MiB cap). The old in-memory preparation held every document and every encoding (several
    times the corpus). Small tasks (64 KiB) reach the steady state early in both;
    benchmarks/bench_data.py measures the 1 GB corpus with the defaults."""
    peaks = {}
    sizes = (2_000_000, 10_000_000)
    for size in sizes:
        corpus = str(tmp_path / f"c{size}.jsonl")
        written = write_jsonl_corpus(corpus, size, seed=1)
        r = measure_prepare(out=str(tmp_path / f"out{size}"), inputs=[corpus], tokenizer=tokenizer,
                            shard_tokens=1_000_000, workers=2, batch_bytes=1 << 16, progress=False)
        assert r["duplicate_documents"] == written["duplicates"] > 0
        peaks[size] = r
    extra_mb = (sizes[1] - sizes[0]) / 2**20
    for key in ("main_peak_rss_mb", "worker_peak_rss_mb"):
        grew = peaks[sizes[1]][key] - peaks[sizes[0]][key]
        assert grew < 0.25 * extra_mb, f"{key}: {peaks}"
