"""Data preparation at corpus scale: peak RSS, time and tokens/s of train/prepare_data.py on a
generated JSONL corpus, and the start time and RSS of a TokenLoader over the result.

    python benchmarks/bench_data.py --gigabytes 1            # the issue's 1 GB run (minutes on 2 cores)
    python benchmarks/bench_data.py --gigabytes 0.05 --keep /tmp/bench_data

Peak RSS is read inside the process that runs prepare(): VmHWM (/proc/self/status) for the main
process, and resource.getrusage: RUSAGE_SELF (which on Linux also keeps the parent's RSS from
before exec, so it reads high when the parent is large, e.g. pytest with torch) and
RUSAGE_CHILDREN, the largest tokenizer worker (the pool is joined first).
A script, not a pytest benchmark: one run is minutes, and its figures are memory, not a median.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl_corpus(path: str, n_bytes: int, seed: int = 0, dup_every: int = 20) -> dict:
    """A JSONL corpus of about n_bytes: documents of 5-40 sentences of made-up words, each opened by
    a unique title line (so no two are equal by chance); every dup_every'th document repeats an
    earlier one exactly. Returns {"documents", "duplicates", "bytes"} as written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(4000)]
    sentences = [" ".join(words[j] for j in rng.integers(0, len(words), size=rng.integers(6, 20))).capitalize() + "."
                 for _ in range(20000)]
    recent: list[str] = []
    docs = dups = written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            if dup_every and docs % dup_every == dup_every - 1 and recent:
                text = recent[int(rng.integers(0, len(recent)))]
                dups += 1
            else:
                picks = rng.integers(0, len(sentences), size=rng.integers(5, 40))
                text = f"Document {docs}\n" + " ".join(sentences[j] for j in picks) + "\n"
                if len(recent) < 1000:
                    recent.append(text)
                else:
                    recent[int(rng.integers(0, 1000))] = text
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return {"documents": docs, "duplicates": dups, "bytes": os.path.getsize(path)}


_PREPARE = """
import json, resource, sys, time
from phi_train.prepare_data import prepare
t = time.perf_counter()
meta = prepare(**{kwargs!r})
seconds = time.perf_counter() - t
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "main_peak_rss_mb": hwm / 1024,
                  "main_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "cpu_s": sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                                 resource.getrusage(resource.RUSAGE_CHILDREN))),
                  "tokens": meta["train_tokens"] + meta["val_tokens"], "documents": meta["documents"],
                  "duplicate_documents": meta["duplicate_documents"]}}))
"""


def measure_prepare(**kwargs) -> dict:
    """Runs prepare(**kwargs) in a fresh process; its time, peak RSS (main, largest worker), tokens."""
    out = subprocess.run([sys.executable, "-c", _PREPARE.format(root=ROOT, kwargs=kwargs)], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["tokens_per_cpu_s"] = result["tokens"] / result["cpu_s"]  # independent of other load on the machine
    result["summary"] = [line for line in out.stderr.splitlines() if " tokens from " in line][-1:]
    return result


_LOADER = """
import json, os, resource, sys, time
import numpy as np, torch
from phi_train.data import TokenLoader

def rss_mb():  # anonymous memory, and pages of mapped files (the shards' page cache, reclaimable)
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {{k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}}

before = rss_mb()
t = time.perf_counter()
loader = TokenLoader({data!r}, "train", {seq_len}, {micro_batch}, rank=0, world={world}, seed=0)
start_s = time.perf_counter() - t
after_start = rss_mb()
for _ in range({batches}):
    loader.next_batch()
print(json.dumps({{"start_s": start_s, "rss_before_mb": before, "rss_after_start_mb": after_start,
                  "rss_after_batches_mb": rss_mb(), "windows": loader.n_windows, "shards": len(loader.paths)}}))
"""


def measure_loader(data: str, seq_len: int = 2048, micro_batch: int = 8, world: int = 8, batches: int = 100) -> dict:
    """A TokenLoader over `data` in a fresh process (torch imported first): its construction time
    and RSS before, after construction and after `batches` batches."""
    code = _LOADER.format(root=ROOT, data=data, seq_len=seq_len, micro_batch=micro_batch, world=world,
                          batches=batches)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"loader failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sparse_corpus(directory: str, shards: int = 3000, shard_tokens: int = 50_000_000) -> None:
    """A prepared directory of the paper's size (3000 x 50M = 150B tokens) in sparse files: valid
    uint16 shards of zeros that occupy no disk blocks, to time the loader's start at that scale."""
    from phi_train.data import HEADER, shard_header, write_shard

    os.makedirs(directory, exist_ok=True)
    names = [f"train_{k:03d}.bin" for k in range(shards)]
    for name in names:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(shard_header(2, shard_tokens))
            f.truncate(HEADER.size + 2 * shard_tokens)
    write_shard(os.path.join(directory, "val_000.bin"), np.zeros(0, dtype=np.int64))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"vocab_size": 51200, "eos_token_id": 0, "train_tokens": shards * shard_tokens, "val_tokens": 0,
                   "shards": {"train": names, "val": ["val_000.bin"]}}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gigabytes", type=float, default=1.0, help="size of the generated JSONL corpus")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: prepare's)")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        corpus = os.path.join(work, "corpus.jsonl")
        if os.path.exists(corpus) and os.path.getsize(corpus) >= args.gigabytes * 1e9:  # kept from an earlier run
            written = {"bytes": os.path.getsize(corpus), "reused": True}
        else:
            written = write_jsonl_corpus(corpus, int(args.gigabytes * 1e9))
        print(f"corpus: {written}", flush=True)
        results = {"corpus": written}
        results["prepare"] = measure_prepare(out=os.path.join(work, "shards"), inputs=[corpus], workers=args.workers,
                                             overwrite=True, progress=False)
        print(f"prepare: {results['prepare']}", flush=True)
        results["loader"] = measure_loader(os.path.join(work, "shards"))
        print(f"loader: {results['loader']}", flush=True)
        sparse_corpus(os.path.join(work, "paper_scale"))
        results["loader_150B_tokens_sparse"] = measure_loader(os.path.join(work, "paper_scale"), world=128)
        print(f"loader, 150B tokens in 3000 sparse shards, rank 0 of 128: {results['loader_150B_tokens_sparse']}",
              flush=True)
        shutil.rmtree(os.path.join(work, "paper_scale"))
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
