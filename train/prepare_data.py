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
between documents, every --val-every'th document to validation; <out>/meta.json (which lists the
shards; the loader refuses a directory whose shards differ). The directory is built beside <out>
and swapped in whole; a non-empty <out> is refused unless --overwrite. Inputs inside <out> (or
<out> inside an input folder) are refused; null or blank documents are skipped and counted, files
of unknown type inside input folders are listed on stderr.
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


def _text_value(value, where: str, field: str, stats: dict | None) -> str | None:
    """A document's text, or None (counted in stats) for a null or blank one; anything but a
    string is refused (a number or a list would be tokenised as its repr)."""
    if value is None:
        if stats is not None:
            stats["null"] = stats.get("null", 0) + 1
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__} {str(value)[:40]!r}, not a string")
    if not value.strip():
        if stats is not None:
            stats["empty"] = stats.get("empty", 0) + 1
        return None
    return value


def _input_files(inputs: list[str], stats: dict | None) -> Iterator[str]:
    for inp in inputs:
        if os.path.isdir(inp):
            paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(inp) for f in fs)
            for path in paths:
                if path.endswith((".jsonl", ".parquet") + TEXT_SUFFIXES):
                    yield path
                elif stats is not None:
                    stats.setdefault("unknown_files", []).append(path)
        elif os.path.exists(inp):
            if not inp.endswith((".jsonl", ".parquet") + TEXT_SUFFIXES):
                raise ValueError(f"--input {inp}: unknown file type (known: .jsonl, .parquet, "
                                 f"{', '.join(TEXT_SUFFIXES)})")
            yield inp
        else:
            raise FileNotFoundError(f"--input {inp}: no such file or folder")


def iter_documents(inputs: list[str], field: str, stats: dict | None = None) -> Iterator[str]:
    """The documents of the inputs. Null or blank documents are skipped and counted in
    stats["null"] / stats["empty"]; files of unknown type inside folders are listed in
    stats["unknown_files"] (an unknown file named directly is an error)."""
    for path in _input_files(inputs, stats):
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="strict") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
                    if field not in row:
                        raise ValueError(f"{path}:{n}: no field {field!r} (use --field; fields here: "
                                         f"{sorted(row)[:8]})")
                    text = _text_value(row[field], f"{path}:{n}", field, stats)
                    if text is not None:
                        yield text
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            if field not in names:
                raise ValueError(f"{path}: no column {field!r} (use --field; columns: {names[:8]})")
            for i, x in enumerate(pq.read_table(path, columns=[field]).column(field).to_pylist()):
                text = _text_value(x, f"{path} row {i}", field, stats)
                if text is not None:
                    yield text
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                yield text
            elif stats is not None:
                stats["empty"] = stats.get("empty", 0) + 1


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


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_arguments(out: str, inputs: list[str] | None, field: str, tokenizer: str | None, vocab_size: int,
                    val_every: int, max_bytes: int, shard_tokens: int, overwrite: bool) -> None:
    """Every argument, before anything is read or written (errors name the flag)."""
    for name, v, lo in (("--vocab-size", vocab_size, 1), ("--val-every", val_every, 0), ("--max-bytes", max_bytes, 1),
                        ("shard_tokens", shard_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(field, str) or not field:
        raise ValueError(f"--field must be a non-empty string, got {field!r}")
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a directory path, got {out!r}")
    out_real = os.path.realpath(out)
    if os.path.exists(out_real) and not os.path.isdir(out_real):
        raise ValueError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out_real) and os.listdir(out_real) and not overwrite:
        raise ValueError(f"--out {out}: the directory is not empty (shards of an earlier run?): its files would mix "
                         "with the new ones. Pass --overwrite to replace it whole, or choose another --out")
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
    if tokenizer:
        path = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.json there")


def prepare(out: str, inputs: list[str] | None = None, field: str = "text", tokenizer: str | None = None,
            vocab_size: int = 8192, val_every: int = 20, max_bytes: int = 6_000_000,
            shard_tokens: int = 50_000_000, overwrite: bool = False) -> dict:
    """Prepares <out>. Nothing is written until every argument and every input document has been
    checked; then the whole directory (shards, tokenizer.json, meta.json) is built in a sibling
    temporary directory and swapped in at once (phi_model.atomic.replace_directory). A non-empty
    <out> is refused unless overwrite=True, and then replaced whole: never a mix of two runs."""
    from phi_model.atomic import atomic_write_text, replace_directory

    check_arguments(out, inputs, field, tokenizer, vocab_size, val_every, max_bytes, shard_tokens, overwrite)
    stats: dict = {}
    docs = list(iter_documents(inputs or stdlib_files(max_bytes), field, stats))
    unknown = stats.pop("unknown_files", [])
    if unknown:
        print(f"prepare_data: skipped {len(unknown)} file(s) of unknown type (known: .jsonl, .parquet, "
              f"{', '.join(TEXT_SUFFIXES)}): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}",
              file=sys.stderr)
    if stats:
        print(f"prepare_data: skipped documents: {', '.join(f'{v} {k}' for k, v in sorted(stats.items()))}",
              file=sys.stderr)
    if not docs:
        raise ValueError(f"no documents found in the inputs {inputs or '(the standard library)'}")
    tok = load_or_train_tokenizer(tokenizer, docs, vocab_size)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"--tokenizer {tokenizer}: the tokenizer has no {EOS!r} token to separate documents")
    train, val = [], []
    for i, enc in enumerate(tok.encode_batch(docs)):
        (val if val_every and i % val_every == val_every - 1 else train).append(np.asarray(enc.ids + [eos]))
    meta = {"vocab_size": tok.get_vocab_size(), "eos_token_id": eos, "documents": len(docs),
            "skipped_documents": stats, "skipped_files": len(unknown), "shards": {}}
    splits = {}
    for split, parts in (("train", train), ("val", val)):
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        n_shards = max(1, -(-len(tokens) // shard_tokens))
        splits[split] = tokens
        meta["shards"][split] = [f"{split}_{k:03d}.bin" for k in range(n_shards)]
        meta[f"{split}_tokens"] = int(len(tokens))

    def build(tmp: str) -> None:
        for split, tokens in splits.items():
            for k, name in enumerate(meta["shards"][split]):
                write_shard(os.path.join(tmp, name), tokens[k * shard_tokens:(k + 1) * shard_tokens])
        tok.save(os.path.join(tmp, "tokenizer.json"))
        atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))  # written last: "done"

    replace_directory(out, build, order=["meta.json"])
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
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out directory whole (default: refuse it)")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.out, args.input, args.field, args.tokenizer, args.vocab_size, args.val_every,
                       args.max_bytes, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
