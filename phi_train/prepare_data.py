"""Turn text into token shards for train/pretrain.py, streaming, in bounded memory.

    python train/prepare_data.py --out data/stdlib                       # the embedded default corpus
    python train/prepare_data.py --input docs/ more.jsonl --field text --out data/mine
    python train/prepare_data.py --input corpus.parquet --field content --tokenizer path/to/phi-1_5 --out data/x
    python train/prepare_data.py --hf-dataset user/name --hf-split train --field text --out data/hf   # needs `datasets`

Inputs: text-like files (.txt .md .py .rst ...: one document per file, files over
--max-document-bytes cut at line breaks), JSONL (one document per line, --field), Parquet
(--field column, read a record batch at a time), folders of them, or (only where the `datasets`
package is installed) a Hugging Face dataset name or a dataset folder saved by `save_to_disk`.
Default corpus, needing no download: the .py sources of this Python's standard library.
Tokenizer: a local tokenizer.json (a real phi-1.5 directory works: CodeGen/GPT-2 BPE), or a
byte-level BPE trained here on the first --tokenizer-sample-bytes of the corpus (--vocab-size).
It is saved as <out>/tokenizer.json.

How it runs: the main process reads documents one at a time, drops exact duplicates (a 128-bit
BLAKE2b digest per document, looked up in an SQLite table on disk: RAM holds its page cache, not
the set), sends every --val-every'th kept document to validation, and hands batches of
--batch-bytes of text (1 MiB) to --workers processes that tokenize them with HF tokenizers' batch
encoding; at most 2 x workers batches are in flight. Tokens go to fixed-size shards of --shard-tokens tokens
as they arrive (<split>_NNN.bin, see train/data.py for the format; one EOS after every document).
Memory is bounded by the batch size, the worker count, the SQLite cache, the largest single
document (a JSONL line) and Parquet row group, and (without --tokenizer) the BPE training sample,
never by the corpus. A hub dataset is fingerprinted by name, config and split only.

Resume and reuse: work happens in <out>'s sibling .<name>.prepare-partial/, checkpointed (shards
done, the position in the inputs, the digests, the counts, in one SQLite transaction) each time a
shard is finished. Inputs and settings have a fingerprint (files' paths, sizes and mtimes; every
setting; the tokenizer's bytes): a re-run with the same fingerprint continues after the last
finished shard, and a finished <out> with the same fingerprint is left as it is. Anything else
never mixes: a stale partial directory is discarded, and a non-empty <out> is refused unless
--overwrite, which replaces it whole (built beside it, swapped in at once). Inputs inside <out>
(or <out> inside an input folder) are refused; null or blank documents are skipped and counted,
files of unknown type inside input folders are counted and the first few listed on stderr.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import sysconfig
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from phi_train.data import HEADER, check_shards, phi_model_module, read_meta, shard_header

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ".toml", ".cfg")
KNOWN_SUFFIXES = (".jsonl", ".parquet") + TEXT_SUFFIXES
EOS = "<|endoftext|>"
FORMAT = 2  # bump when the output for the same inputs and settings changes
CHECKPOINT_SECONDS = 300.0  # also checkpoint this often when shards are large


# ----------------------------------------------------------------------------- reading documents

def stdlib_files(max_bytes: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                files.append(path)
                total += os.path.getsize(path)
                if total >= max_bytes:
                    return files
    return files


def _text_value(value, where: str, field: str, stats: dict) -> str | None:
    """A document's text, or None (counted in stats) for a null or blank one; anything but a
    string is refused (a number or a list would be tokenised as its repr)."""
    if value is None:
        stats["null"] = stats.get("null", 0) + 1
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__} {str(value)[:40]!r}, not a string")
    if not value.strip():
        stats["empty"] = stats.get("empty", 0) + 1
        return None
    return value


def input_files(inputs: list[str], unknown: dict | None = None) -> Iterator[str]:
    """The known files of the inputs in a fixed order (folders walked in sorted order, streaming:
    no list of all files). Files of unknown type inside folders are counted in unknown["count"]
    (the first five named in unknown["names"]); an unknown file named directly is an error."""
    for inp in inputs:
        if os.path.isdir(inp):
            for dirpath, dirnames, filenames in os.walk(inp):
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    if name.endswith(KNOWN_SUFFIXES):
                        yield path
                    elif unknown is not None:
                        unknown["count"] = unknown.get("count", 0) + 1
                        if len(unknown.setdefault("names", [])) < 5:
                            unknown["names"].append(path)
        elif os.path.exists(inp):
            if not inp.endswith(KNOWN_SUFFIXES):
                raise ValueError(f"--input {inp}: unknown file type (known: {', '.join(KNOWN_SUFFIXES)})")
            yield inp
        else:
            raise FileNotFoundError(f"--input {inp}: no such file or folder")


def _jsonl_records(path: str, field: str, offset: int, line: int, stats: dict):
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset, line = offset + len(raw), line + 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{line}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line}: expected a JSON object per line, got {type(row).__name__}")
            if field not in row:
                raise ValueError(f"{path}:{line}: no field {field!r} (use --field; fields here: {sorted(row)[:8]})")
            text = _text_value(row[field], f"{path}:{line}", field, stats)
            if text is not None:
                yield text, offset, line


def _parquet_records(path: str, field: str, row: int, stats: dict):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow, which is not installed here "
                         "(pip install 'phi-kernels[train]' or pip install pyarrow)") from None

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (use --field; columns: {names[:8]})")
    group, first = 0, 0  # the row group holding `row` (resume), and its first row
    while group < pf.num_row_groups and first + pf.metadata.row_group(group).num_rows <= row:
        first += pf.metadata.row_group(group).num_rows
        group += 1
    if group == pf.num_row_groups:
        return
    i = first
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(group, pf.num_row_groups), columns=[field]):
        for value in batch.column(0).to_pylist():
            i += 1
            if i <= row:
                continue
            text = _text_value(value, f"{path} row {i - 1}", field, stats)
            if text is not None:
                yield text, i, i


def _text_pieces(path: str, offset: int, max_bytes: int, stats: dict):
    """A text file as one document, or pieces of at most max_bytes cut after a line break (or at a
    UTF-8 character boundary when a piece has none)."""
    with open(path, "rb") as f:
        f.seek(offset)
        while piece := f.read(max_bytes):
            following = f.read(1)
            if following:  # more to come: end this piece after its last line break
                cut = piece.rfind(b"\n") + 1
                if cut == 0:  # no line break: end it before the first byte of a character
                    data = piece + following
                    cut = len(piece)
                    while cut > 0 and data[cut] & 0xC0 == 0x80:
                        cut -= 1
                    cut = cut or len(piece)
                piece = piece[:cut]
            offset += len(piece)
            f.seek(offset)
            text = piece.decode("utf-8", errors="replace")
            if text.strip():
                yield text, offset, 0
            else:
                stats["empty"] = stats.get("empty", 0) + 1


def _hf_records(spec: dict, field: str, row: int, stats: dict):
    datasets = _import_datasets(spec["name"])
    name, split = spec["name"], spec["split"]
    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):  # a DatasetDict
            ds = ds[split]
        ds = ds.to_iterable_dataset() if hasattr(ds, "to_iterable_dataset") else ds
    else:
        ds = datasets.load_dataset(name, spec.get("config"), split=split, streaming=True)
    if row:
        ds = ds.skip(row)
    for i, example in enumerate(ds, row + 1):
        if field not in example:
            raise ValueError(f"--hf-dataset {name} row {i - 1}: no field {field!r} (use --field; fields here: "
                             f"{sorted(example)[:8]})")
        text = _text_value(example[field], f"--hf-dataset {name} row {i - 1}", field, stats)
        if text is not None:
            yield text, i, i


def _import_datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--hf-dataset {name}: needs the Hugging Face `datasets` package, which is not installed "
                         "here (pip install datasets), or export the dataset to JSONL or Parquet and pass it with "
                         "--input") from None
    return datasets


def iter_documents(inputs: list[str], field: str, stats: dict, start: tuple = (0, 0, 0),
                   max_document_bytes: int = 16 << 20, hf: dict | None = None,
                   unknown: dict | None = None) -> Iterator[tuple[str, tuple]]:
    """(text, cursor) for every document from `start` on. cursor = (file number, byte offset or
    row, line) of the next record: passing it back as `start` continues right after this
    document. Null or blank documents are skipped and counted in stats["null"] / ["empty"]."""
    if hf is not None:
        for text, row, _ in _hf_records(hf, field, start[1], stats):
            yield text, (0, row, row)
        return
    for number, path in enumerate(input_files(inputs, unknown)):
        if number < start[0]:
            continue
        offset, line = start[1:] if number == start[0] else (0, 0)
        if path.endswith(".jsonl"):
            records = _jsonl_records(path, field, offset, line, stats)
        elif path.endswith(".parquet"):
            records = _parquet_records(path, field, offset, stats)
        else:
            records = _text_pieces(path, offset, max_document_bytes, stats)
        for text, offset, line in records:
            yield text, (number, offset, line)


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_path(tokenizer: str) -> str:
    return os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _first_bytes(docs: Iterator[tuple[str, tuple]], limit: int) -> Iterator[str]:
    total = 0
    for text, _ in docs:
        yield text
        total += len(text)
        if total >= limit:
            return


_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode(texts: list[str], to_val: list[bool], eos: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, val tokens) of a batch, documents in order, EOS after each (in a worker)."""
    train: list[int] = []
    val: list[int] = []
    for enc, v in zip(_worker_tokenizer.encode_batch_fast(texts), to_val):
        ids = val if v else train
        ids.extend(enc.ids)
        ids.append(eos)
    return np.array(train, dtype=dtype), np.array(val, dtype=dtype)


# ----------------------------------------------------------------------------- on-disk state

class SeenDigests:
    """Exact-duplicate detection plus the checkpoint, in one SQLite file: the digests of the
    documents kept so far (a B-tree on disk; RAM holds only SQLite's page cache, `cache_mb`) and the
    progress record, committed together so a resumed run's digests match its position."""

    def __init__(self, path: str, cache_mb: int = 32):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("BEGIN")

    def add(self, digest: bytes) -> bool:
        """True if new (and now remembered), False for a duplicate."""
        return self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,)).rowcount == 1

    def get(self, key: str):
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def commit(self, **values) -> None:
        for key, value in values.items():
            self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def close(self) -> None:
        self.db.close()


class ShardWriter:
    """One split's tokens, appended to <dir>/<split>_NNN.partial; every `shard_tokens` tokens the
    partial file becomes the shard <split>_NNN.bin (header + tokens, written atomically) and a new
    partial file starts. state() is what a checkpoint records; resume() truncates back to it."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, shard_tokens: int, state: dict | None = None):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.shards, self.partial_tokens = (state["shards"], state["partial_tokens"]) if state else (0, 0)
        path = os.path.join(directory, self._name(self.shards, "partial"))
        size = self.partial_tokens * self.dtype.itemsize
        if (os.path.getsize(path) if os.path.exists(path) else 0) < size:
            # The shard open at the checkpoint was finished later (its partial file became the .bin):
            # the checkpoint's tokens are that shard's first ones.
            finished = os.path.join(directory, self._name(self.shards, "bin"))
            with open(finished, "rb") as src, open(path, "wb") as dst:
                src.seek(HEADER.size)
                dst.write(src.read(size))
        for name in os.listdir(directory):  # whatever came after the checkpoint is redone
            if name.startswith(f"{split}_") and name != self._name(self.shards, "partial"):
                number = name[len(split) + 1:].split(".")[0]
                if number.isdigit() and int(number) >= self.shards:
                    os.remove(os.path.join(directory, name))
        self.f = open(path, "r+b" if os.path.exists(path) else "w+b")
        self.f.truncate(size)
        self.f.seek(size)

    def _name(self, k: int, kind: str) -> str:
        return f"{self.split}_{k:03d}.{kind}"

    @property
    def tokens(self) -> int:
        return self.shards * self.shard_tokens + self.partial_tokens

    def append(self, tokens: np.ndarray) -> int:
        """Appends tokens; returns how many shards that finished."""
        finished = 0
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.partial_tokens)
            self.f.write(tokens[:take].tobytes())
            self.partial_tokens += take
            tokens = tokens[take:]
            if self.partial_tokens == self.shard_tokens:
                self._close_shard()
                finished += 1
        return finished

    def _close_shard(self) -> None:
        partial = os.path.join(self.directory, self._name(self.shards, "partial"))
        self.f.flush()
        self.f.seek(0)
        n = self.partial_tokens

        def write(out):
            out.write(shard_header(self.dtype.itemsize, n))
            shutil.copyfileobj(self.f, out, 16 << 20)

        phi_model_module("atomic").atomic_write(os.path.join(self.directory, self._name(self.shards, "bin")), write)
        self.f.close()
        os.remove(partial)
        self.shards, self.partial_tokens = self.shards + 1, 0
        self.f = open(os.path.join(self.directory, self._name(self.shards, "partial")), "w+b")

    def state(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        return {"shards": self.shards, "partial_tokens": self.partial_tokens}

    def finish(self) -> list[str]:
        """Closes the last (shorter) shard; a split with no tokens gets one empty shard."""
        if self.partial_tokens or not self.shards:
            self._close_shard()
        self.f.close()
        os.remove(os.path.join(self.directory, self._name(self.shards, "partial")))
        return [self._name(k, "bin") for k in range(self.shards)]


# ----------------------------------------------------------------------------- validation, fingerprint

def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_arguments(out: str, inputs: list[str] | None, field: str, tokenizer: str | None, vocab_size: int,
                    val_every: int, max_bytes: int, shard_tokens: int, workers: int, tokenizer_sample_bytes: int,
                    max_document_bytes: int, batch_bytes: int, hf_dataset: str | None, hf_split: str) -> None:
    """Every argument, before anything is read or written (errors name the flag)."""
    for name, v, lo in (("--vocab-size", vocab_size, 1), ("--val-every", val_every, 0), ("--max-bytes", max_bytes, 1),
                        ("--shard-tokens", shard_tokens, 1), ("--workers", workers, 0),
                        ("--tokenizer-sample-bytes", tokenizer_sample_bytes, 1),
                        ("--max-document-bytes", max_document_bytes, 1), ("--batch-bytes", batch_bytes, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(field, str) or not field:
        raise ValueError(f"--field must be a non-empty string, got {field!r}")
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a directory path, got {out!r}")
    out_real = os.path.realpath(out)
    if os.path.exists(out_real) and not os.path.isdir(out_real):
        raise ValueError(f"--out {out}: exists and is not a directory")
    if hf_dataset is not None:
        if inputs:
            raise ValueError(f"--hf-dataset {hf_dataset} and --input {inputs}: give one source, not both")
        if not isinstance(hf_dataset, str) or not hf_dataset or not isinstance(hf_split, str) or not hf_split:
            raise ValueError(f"--hf-dataset / --hf-split must be non-empty strings, got {hf_dataset!r} / {hf_split!r}")
        _import_datasets(hf_dataset)
        inputs = [hf_dataset] if os.path.isdir(hf_dataset) else []
    for inp in inputs or []:
        if not os.path.exists(inp):
            raise FileNotFoundError(f"--input {inp}: no such file or folder")
        real = os.path.realpath(inp)
        if _inside(real, out_real):
            raise ValueError(f"--input {inp} is inside --out {out}: the output directory is replaced as a whole, and "
                             "a second run would read its own shards as documents; keep inputs outside --out")
        if os.path.isdir(real) and _inside(out_real, real):
            raise ValueError(f"--out {out} is inside --input {inp}: a second run would read the outputs "
                             "(meta.json, tokenizer.json) as documents; put --out outside the input folder")
    if tokenizer and not os.path.isfile(tokenizer_path(tokenizer)):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.json there")


def fingerprint(settings: dict, files: list[str] | None, hf: dict | None) -> str:
    """sha256 of the settings and of every input file's real path, size and mtime (a streaming
    walk: O(1) memory in the number of files). A hub dataset counts by name, config and split."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    walk = files if hf is None else ([hf["name"]] if os.path.isdir(hf["name"]) else [])
    for path in (input_files(walk) if hf is None else (os.path.join(d, f) for p in walk
                                                       for d, _, fs in sorted(os.walk(p)) for f in sorted(fs))):
        st = os.stat(path)
        h.update(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _finished(out: str, fp: str) -> dict | None:
    """meta.json of a finished <out> with this fingerprint whose shards check out, else None."""
    try:
        meta = read_meta(out)
        if meta.get("fingerprint") != fp:
            return None
        for split in ("train", "val"):
            check_shards(out, split, meta)
    except (ValueError, FileNotFoundError):
        return None
    return meta


# ----------------------------------------------------------------------------- preparation

def prepare(out: str, inputs: list[str] | None = None, field: str = "text", tokenizer: str | None = None,
            vocab_size: int = 8192, val_every: int = 20, max_bytes: int = 6_000_000,
            shard_tokens: int = 50_000_000, overwrite: bool = False, *, workers: int | None = None,
            dedup: bool = True, hf_dataset: str | None = None, hf_config: str | None = None, hf_split: str = "train",
            tokenizer_sample_bytes: int = 64 << 20, max_document_bytes: int = 16 << 20, batch_bytes: int = 1 << 20,
            progress: bool | None = None) -> dict:
    """Prepares <out> (see the module docstring) and returns its meta.json. Every argument is
    checked before anything is written; a bad document found while streaming stops the run,
    removes the partial work and leaves <out> as it was."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    check_arguments(out, inputs, field, tokenizer, vocab_size, val_every, max_bytes, shard_tokens, workers,
                    tokenizer_sample_bytes, max_document_bytes, batch_bytes, hf_dataset, hf_split)
    hf = {"name": hf_dataset, "config": hf_config, "split": hf_split} if hf_dataset else None
    files = None if hf else (inputs or stdlib_files(max_bytes))
    tok_sha = None
    if tokenizer:
        with open(tokenizer_path(tokenizer), "rb") as f:
            tok_sha = hashlib.file_digest(f, "sha256").hexdigest()
    settings = {"format": FORMAT, "field": field, "tokenizer_sha256": tok_sha, "val_every": val_every,
                "shard_tokens": shard_tokens, "dedup": dedup, "max_document_bytes": max_document_bytes, "hf": hf,
                "trained_tokenizer": None if tokenizer else {"vocab_size": vocab_size,
                                                             "sample_bytes": tokenizer_sample_bytes}}
    fp = fingerprint(settings, files, hf)
    done = _finished(out, fp)
    if done is not None:
        print(f"prepare_data: {out} is already prepared from these inputs and settings; nothing to do", file=sys.stderr)
        return done
    out_real = os.path.realpath(out)
    if os.path.isdir(out_real) and os.listdir(out_real) and not overwrite:
        raise ValueError(f"--out {out}: the directory is not empty and was not prepared from these inputs and settings "
                         "(shards of an earlier run?): its files would mix with the new ones. Pass --overwrite to "
                         "replace it whole, or choose another --out")
    tok = None
    if tokenizer:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(tokenizer_path(tokenizer))
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise ValueError(f"--tokenizer {tokenizer}: cannot load {tokenizer_path(tokenizer)}: {e}") from None
        if tok.token_to_id(EOS) is None:
            raise ValueError(f"--tokenizer {tokenizer}: the tokenizer has no {EOS!r} token to separate documents")
    staging = os.path.join(os.path.dirname(out_real), f".{os.path.basename(out_real)}.prepare-partial")
    os.makedirs(os.path.dirname(out_real), exist_ok=True)
    lock_path = staging + ".lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out}: another prepare_data run is preparing it right now "
                             f"(it holds {lock_path})") from None
        try:
            return _Run(out, staging, fp, settings, files, hf, field, tok, vocab_size, val_every, shard_tokens, dedup,
                        workers, tokenizer_sample_bytes, max_document_bytes, batch_bytes, progress).run()
        finally:
            if not os.path.exists(staging):  # finished, or bad input: nothing left to resume
                os.remove(lock_path)


@dataclass
class _Run:
    """One preparation: resume or start the partial directory, stream, checkpoint, publish."""

    out: str
    staging: str
    fp: str
    settings: dict
    files: list[str] | None
    hf: dict | None
    field: str
    tok: object  # tokenizers.Tokenizer, or None to train one
    vocab_size: int
    val_every: int
    shard_tokens: int
    dedup: bool
    workers: int
    sample_bytes: int
    max_document_bytes: int
    batch_bytes: int
    progress: bool | None
    db: SeenDigests | None = None
    pool: object = None

    def _docs(self, stats: dict, start=(0, 0, 0), unknown: dict | None = None):
        return iter_documents(self.files or [], self.field, stats, start, self.max_document_bytes, self.hf, unknown)

    def _open_staging(self) -> dict | None:
        """The checkpoint of a partial directory with this fingerprint, else None (and the stale
        partial directory, if any, removed)."""
        db_path = os.path.join(self.staging, "state.sqlite")
        if os.path.exists(db_path):
            try:
                db = SeenDigests(db_path)
                fp, progress = db.get("fingerprint"), db.get("progress")
                if fp == self.fp and progress is not None:
                    self.db = db
                    return progress
                db.close()
            except sqlite3.Error:
                pass
        if os.path.exists(self.staging):
            print(f"prepare_data: discarding {self.staging} (partial work for other inputs or settings)",
                  file=sys.stderr)
            shutil.rmtree(self.staging)
        return None

    def _start_staging(self) -> dict:
        if self.tok is None:  # trained on the first sample_bytes of documents, before anything is written
            self.tok = train_tokenizer(_first_bytes(self._docs({}), self.sample_bytes), self.vocab_size)
        os.makedirs(self.staging)
        phi_model_module("atomic").atomic_write_text(os.path.join(self.staging, "tokenizer.json"), self.tok.to_str())
        self.db = SeenDigests(os.path.join(self.staging, "state.sqlite"))
        progress = {"cursor": [0, 0, 0], "kept": 0, "duplicates": 0, "skipped": {}, "documents": {"train": 0, "val": 0},
                    "train": None, "val": None}
        self.db.commit(fingerprint=self.fp, progress=progress)
        return progress

    def run(self) -> dict:
        progress = self._open_staging()
        resumed = progress is not None
        if resumed:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(os.path.join(self.staging, "tokenizer.json"))
        try:
            if not resumed:
                progress = self._start_staging()
            return self._stream(progress, resumed)
        except ValueError:
            # Bad input: the partial work cannot be resumed (fixing the input changes the fingerprint).
            self._close_db()
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        except BaseException:
            print(f"prepare_data: stopped; run the same command again to continue after the last finished shard "
                  f"(kept in {self.staging})", file=sys.stderr)
            raise
        finally:
            self._close_db()  # what came after the last checkpoint is rolled back

    def _close_db(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def _stream(self, p: dict, resumed: bool) -> dict:
        from tqdm import tqdm

        eos = self.tok.token_to_id(EOS)
        vocab = self.tok.get_vocab_size()
        dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
        writers = {s: ShardWriter(self.staging, s, dtype, self.shard_tokens, p[s]) for s in ("train", "val")}
        if resumed:
            print(f"prepare_data: resuming {self.out}: {writers['train'].shards} train and {writers['val'].shards} val "
                  "shards already done", file=sys.stderr)
        stats, unknown = p["skipped"], {}
        bar = tqdm(desc="prepare_data", unit="tok", unit_scale=True, initial=writers["train"].tokens
                   + writers["val"].tokens, disable=(None if self.progress is None else not self.progress),
                   file=sys.stderr, smoothing=0.1)
        started, last_checkpoint = time.perf_counter(), time.perf_counter()
        pending: deque = deque()
        due, new_tokens = False, 0

        def consume() -> None:
            nonlocal due, new_tokens
            train, val = pending.popleft().result() if self.pool else pending.popleft()
            due |= bool(writers["train"].append(train) + writers["val"].append(val))
            new_tokens += len(train) + len(val)
            bar.update(len(train) + len(val))
            bar.set_postfix(docs=p["kept"], dup=p["duplicates"], shards=writers["train"].shards + writers["val"].shards,
                            refresh=False)

        def submit(texts: list[str], to_val: list[bool]) -> None:
            while len(pending) >= max(1, 2 * self.workers):
                consume()
            args = (texts, to_val, eos, dtype.str)
            pending.append(self.pool.submit(_encode, *args) if self.pool else _encode(*args))

        # Set while the workers fork (lazily, at the first task): stops tokenizers from warning in
        # every child that the parent had used its thread pool (training the BPE). Inline
        # (workers=0), the batch encoding keeps its own threads.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        if self.workers:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.pool = self._start_pool()
        try:
            texts, to_val, size = [], [], 0
            for text, cursor in self._docs(stats, tuple(p["cursor"]), unknown):
                p["cursor"] = list(cursor)
                if self.dedup and not self.db.add(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                                                  digest_size=16).digest()):
                    p["duplicates"] += 1
                    continue
                v = bool(self.val_every) and p["kept"] % self.val_every == self.val_every - 1
                p["kept"] += 1
                p["documents"]["val" if v else "train"] += 1
                texts.append(text)
                to_val.append(v)
                size += len(text)
                if size >= self.batch_bytes:
                    submit(texts, to_val)
                    texts, to_val, size = [], [], 0
                    if due or time.perf_counter() - last_checkpoint > CHECKPOINT_SECONDS:
                        while pending:  # everything read so far is in the shards: a consistent checkpoint
                            consume()
                        self._checkpoint(p, writers)
                        due, last_checkpoint = False, time.perf_counter()
            if texts:
                submit(texts, to_val)
            while pending:
                consume()
        finally:
            if self.pool:
                self.pool.shutdown(wait=True, cancel_futures=True)
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
            bar.close()
        if unknown.get("count"):
            print(f"prepare_data: skipped {unknown['count']} file(s) of unknown type "
                  f"(known: {', '.join(KNOWN_SUFFIXES)}"
                  f"): {', '.join(unknown['names'])}{' ...' if unknown['count'] > 5 else ''}", file=sys.stderr)
        if stats:
            print(f"prepare_data: skipped documents: {', '.join(f'{v} {k}' for k, v in sorted(stats.items()))}",
                  file=sys.stderr)
        if p["kept"] == 0:
            raise ValueError(f"no documents found in the inputs {self.files or self.hf}")
        seconds = time.perf_counter() - started
        meta = {"vocab_size": vocab, "eos_token_id": eos, "documents": p["kept"],
                "duplicate_documents": p["duplicates"],
                "skipped_documents": stats, "skipped_files": unknown.get("count", 0),
                "train_documents": p["documents"]["train"], "val_documents": p["documents"]["val"],
                "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
                "shards": {s: w.finish() for s, w in writers.items()}, "fingerprint": self.fp,
                "settings": self.settings}
        print(f"prepare_data: {meta['train_tokens'] + meta['val_tokens']} tokens from {p['kept']} documents "
              f"({p['duplicates']} exact duplicates removed) in {seconds:.1f} s, "
              f"{new_tokens / max(seconds, 1e-9):.0f} tokens/s", file=sys.stderr)
        self._close_db()
        self._publish(meta)
        return meta

    def _start_pool(self):
        if self.workers == 0:
            global _worker_tokenizer
            _worker_tokenizer = self.tok
            return None
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed for memory)
        # breaks the pool with an error instead of leaving its task waited for forever.
        # fork: the workers need no re-import of the caller's __main__ (train/pretrain.py is a script).
        return ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"), _init_worker,
                                   (self.tok.to_str(),))

    def _checkpoint(self, p: dict, writers: dict) -> None:
        for s, w in writers.items():
            p[s] = w.state()
        self.db.commit(progress=p)

    def _publish(self, meta: dict) -> None:
        """Moves the shards and tokenizer.json into a directory that replaces <out> whole."""
        atomic = phi_model_module("atomic")
        names = meta["shards"]["train"] + meta["shards"]["val"] + ["tokenizer.json"]

        def build(tmp: str) -> None:
            for name in names:
                shutil.move(os.path.join(self.staging, name), os.path.join(tmp, name))
            atomic.atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))  # last: "done"

        atomic.replace_directory(self.out, build, order=["meta.json"])
        shutil.rmtree(self.staging, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (replaced whole; see --overwrite)")
    ap.add_argument("--input", nargs="*", help="files or folders (default: the Python standard library)")
    ap.add_argument("--field", default="text", help="JSONL field / Parquet column / dataset column holding the text")
    ap.add_argument("--tokenizer", help="tokenizer.json, or a folder holding one (default: train a BPE)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the BPE trained without --tokenizer")
    ap.add_argument("--tokenizer-sample-bytes", type=int, default=64 << 20,
                    help="the BPE is trained on this many leading bytes of text")
    ap.add_argument("--val-every", type=int, default=20, help="every N-th kept document goes to validation (0: none)")
    ap.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: min(8, CPUs); 0: inline)")
    ap.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact-duplicate documents")
    ap.add_argument("--max-document-bytes", type=int, default=16 << 20,
                    help="text files larger than this are cut into documents of at most this size at line breaks")
    ap.add_argument("--batch-bytes", type=int, default=1 << 20,
                    help="text per tokenization task (memory: about 2 x workers tasks in flight)")
    ap.add_argument("--max-bytes", type=int, default=6_000_000, help="size cap of the default corpus")
    ap.add_argument("--hf-dataset", help="a Hugging Face dataset name or save_to_disk folder (needs `datasets`)")
    ap.add_argument("--hf-config", help="the dataset's configuration name")
    ap.add_argument("--hf-split", default="train", help="the dataset split to read")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out prepared from other inputs or settings (default: refuse it)")
    ap.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                    help="no progress bar (default: shown on a terminal)")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.out, args.input, args.field, args.tokenizer, args.vocab_size, args.val_every,
                       args.max_bytes, args.shard_tokens, args.overwrite, workers=args.workers, dedup=args.dedup,
                       hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                       tokenizer_sample_bytes=args.tokenizer_sample_bytes,
                       max_document_bytes=args.max_document_bytes, batch_bytes=args.batch_bytes,
                       progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(json.dumps({k: v for k, v in meta.items() if k != "settings"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
