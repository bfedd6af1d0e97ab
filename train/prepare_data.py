"""Turn text into token shards for train/pretrain.py.

    python train/prepare_data.py --out data/stdlib                       # the embedded default corpus
    python train/prepare_data.py --input docs/ more.jsonl --field text --out data/mine
    python train/prepare_data.py --input corpus.parquet --field content --tokenizer path/to/phi-1_5 --out data/x

Inputs: text-like files (.txt .md .py .rst ...), JSONL (one document per line, --field), Parquet
(--field column), or folders of them. Default corpus, needing no download: the .py sources of
this Python's standard library (real code and docstrings: phi-1's domain).
Tokenizer: a local tokenizer.json (a real phi-1.5 directory works: CodeGen/GPT-2 BPE), or a
byte-level BPE trained here on the corpus (--vocab-size). It is saved as <out>/tokenizer.json.
Output: <out>/train_000.bin ... and <out>/val_000.bin (see train/data.py for the format), one EOS
between documents, every --val-every'th document to validation; <out>/meta.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from typing import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.data import write_shard  # noqa: E402

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ".toml", ".cfg")
EOS = "<|endoftext|>"


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


def iter_documents(inputs: list[str], field: str) -> Iterator[str]:
    for inp in inputs:
        if os.path.isdir(inp):
            paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(inp) for f in fs)
        elif os.path.exists(inp):
            paths = [inp]
        else:
            raise FileNotFoundError(f"--input {inp}: no such file or folder")
        for path in paths:
            if path.endswith(".jsonl"):
                with open(path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            row = json.loads(line)
                            if field not in row:
                                raise KeyError(f"{path}:{n}: no field {field!r} (use --field)")
                            yield str(row[field])
            elif path.endswith(".parquet"):
                import pyarrow.parquet as pq

                table = pq.read_table(path, columns=[field])
                yield from (str(x) for x in table.column(field).to_pylist() if x)
            elif path.endswith(TEXT_SUFFIXES):
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if text.strip():
                    yield text


def load_or_train_tokenizer(tokenizer: str | None, docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if tokenizer:
        path = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


def prepare(out: str, inputs: list[str] | None = None, field: str = "text", tokenizer: str | None = None,
            vocab_size: int = 8192, val_every: int = 20, max_bytes: int = 6_000_000,
            shard_tokens: int = 50_000_000) -> dict:
    os.makedirs(out, exist_ok=True)
    docs = list(iter_documents(inputs or stdlib_files(max_bytes), field))
    if not docs:
        raise ValueError("no documents found in the inputs")
    tok = load_or_train_tokenizer(tokenizer, docs, vocab_size)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS!r} token to separate documents")
    train, val = [], []
    for i, enc in enumerate(tok.encode_batch(docs)):
        (val if val_every and i % val_every == val_every - 1 else train).append(np.asarray(enc.ids + [eos]))
    meta = {"vocab_size": tok.get_vocab_size(), "eos_token_id": eos, "documents": len(docs)}
    for split, parts in (("train", train), ("val", val)):
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        for k in range(max(1, -(-len(tokens) // shard_tokens))):
            write_shard(os.path.join(out, f"{split}_{k:03d}.bin"), tokens[k * shard_tokens:(k + 1) * shard_tokens])
        meta[f"{split}_tokens"] = int(len(tokens))
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))  # written last: "done"
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--input", nargs="*", help="files or folders (default: the Python standard library)")
    ap.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text")
    ap.add_argument("--tokenizer", help="tokenizer.json, or a folder holding one (default: train a BPE)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--val-every", type=int, default=20, help="every N-th document goes to validation")
    ap.add_argument("--max-bytes", type=int, default=6_000_000, help="size cap of the default corpus")
    args = ap.parse_args(argv)
    meta = prepare(args.out, args.input, args.field, args.tokenizer, args.vocab_size, args.val_every, args.max_bytes)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
