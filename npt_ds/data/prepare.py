"""`npt-ds prepare`: tokenise a text source once into memory-mapped token shards (see npt_ds/data/prepared.py).

    npt-ds prepare shakespeare --tokenizer smollm2 --out data/prepared/shakespeare
    npt-ds prepare shakespeare --split eval --tokenizer smollm2 --out data/prepared/shakespeare-eval
    npt-ds prepare corpus/*.jsonl --text-key text --tokenizer /models/llama-3.1-8b --out /data/llama-prep --workers 16

Documents are read in order (any source `train` reads), cut at line ends into pieces of at most
PIECE_CHARS characters (so a worker's share does not depend on the worker count), tokenised by K worker
processes (`imap`, order kept: the shards are byte-identical for any K); each document is BOS (where the
tokenizer starts a text with one) + its tokens + EOS, however many pieces it was cut into.  Everything is
written into a temp dir beside --out and renamed into place at the end, so an interrupted run leaves no index.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..config import ConfigError, DataConfig, ModelConfig
from ..model.loading import load_tokenizer
from .sources import document_markers, document_source
from .prepared import FORMAT, INDEX, VERSION, token_dtype, tokenizer_name, vocab_hash

PIECE_CHARS = 1 << 15  # a piece of a document tokenised by itself (cut at a line end)
TASK_CHARS = 1 << 18  # characters per worker task (many tasks keep the workers evenly busy)
SHARD_TOKENS = 1 << 27  # tokens per shard file (256 MB as uint16)


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="+", help="'shakespeare', local .txt/.md/.jsonl/.json/.parquet/.csv files, "
                                             "or a hub dataset name")
    p.add_argument("--tokenizer", default="smollm2", help="the model whose tokenizer to use (as --model: "
                                                          "'smollm2', 'tiny', an HF dir)")
    p.add_argument("--out", required=True, help="the prepared dir to create (must not exist)")
    p.add_argument("--split", default="train", choices=["train", "eval"],
                   help="shakespeare: the training plays or the held-out ones (--holdout); a hub dataset: "
                        "--hub-split or --hub-eval-split")
    p.add_argument("--holdout", default="hamlet,tempest", help="shakespeare: plays held out of train (comma list)")
    p.add_argument("--text-key", default="text", help="the text column of json/parquet/csv/hub rows")
    p.add_argument("--hub-split", default="train")
    p.add_argument("--hub-eval-split", default="validation")
    p.add_argument("--seq-len", type=int, default=None, help="report the number of windows of this length")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def source_config(args) -> DataConfig:
    """The DataConfig whose `document_source` reads SOURCE (the same readers as training)."""
    holdout = [h for h in args.holdout.split(",") if h]
    if args.source == ["shakespeare"]:
        return DataConfig(source="shakespeare", eval_holdout=holdout)
    if all(Path(s).suffix for s in args.source) and any(Path(s).exists() for s in args.source):
        return DataConfig(source="files", files=list(args.source), eval_files=list(args.source),
                          text_key=args.text_key)
    if len(args.source) != 1:
        raise ConfigError(f"prepare: {args.source} are neither local files nor one hub dataset name; "
                          "check the paths")
    return DataConfig(source=args.source[0], text_key=args.text_key, split=args.hub_split,
                      eval_split=args.hub_eval_split)


def pieces(text: str) -> Iterator[str]:
    """`text` in consecutive pieces of at most PIECE_CHARS characters, cut after a newline where there is one."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS) + 1
        cut = cut if cut > start else start + PIECE_CHARS
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def tasks(docs, text_key: str) -> Iterator[list[tuple[str, bool, bool]]]:
    """Worker tasks of ~TASK_CHARS characters: (piece, starts its document, ends it) triples, in document order."""
    task, size = [], 0
    for row in docs:
        text = row.get(text_key)
        if not text:
            continue
        parts = list(pieces(text))
        for i, part in enumerate(parts):
            task.append((part, i == 0, i == len(parts) - 1))
            size += len(part)
            if size >= TASK_CHARS:
                yield task
                task, size = [], 0
    if task:
        yield task


_TOKENIZER = None
_MARKERS: tuple[list[int], list[int]] = ([], [])


def _init_worker(model: str) -> None:
    global _TOKENIZER, _MARKERS
    _TOKENIZER = load_tokenizer(ModelConfig(path=model))
    _MARKERS = document_markers(_TOKENIZER)


def tokenise_task(task: list[tuple[str, bool, bool]]) -> tuple[np.ndarray, int]:
    """(tokens: BOS before each document start and EOS after each end, as the tokenizer uses them; documents
    ended) of one task.  The pieces are tokenised without special tokens, so a long document gets one BOS."""
    ids = _TOKENIZER([text for text, _, _ in task], add_special_tokens=False)["input_ids"]
    head, tail = _MARKERS
    out: list[int] = []
    for piece_ids, (_, starts, ends) in zip(ids, task):
        out.extend(head if starts else ())
        out.extend(piece_ids)
        out.extend(tail if ends else ())
    return np.asarray(out, dtype=np.int64), sum(ends for _, _, ends in task)


class ShardWriter:
    """Appends token arrays and writes shard-NNNNN.npy files of about `shard_tokens` tokens."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int):
        self.out, self.dtype, self.limit = out, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = self.pending_docs = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, docs: int) -> None:
        self.pending.append(tokens.astype(self.dtype))
        self.pending_tokens += len(tokens)
        self.pending_docs += docs
        if self.pending_tokens >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending_tokens:
            return
        name = f"shard-{len(self.shards):05d}.npy"
        np.save(self.out / name, np.concatenate(self.pending))
        self.shards.append({"file": name, "tokens": self.pending_tokens, "documents": self.pending_docs})
        self.pending, self.pending_tokens, self.pending_docs = [], 0, 0


def prepare(args) -> dict:
    """Write the prepared dir; returns its index (plus `tokens_per_s`)."""
    out = Path(args.out).expanduser()
    if out.exists():
        raise ConfigError(f"prepare --out: {str(out)!r} already exists; choose a new dir or remove it")
    if args.workers < 1:
        raise ConfigError("prepare --workers: must be >= 1")
    tokenizer = load_tokenizer(ModelConfig(path=args.tokenizer))
    cfg = source_config(args)
    docs, text_key = document_source(cfg, args.split)
    dtype = token_dtype(len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else tokenizer.vocab_size)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        writer = ShardWriter(tmp, dtype, args.shard_tokens)
        with _progress(args.progress) as bar, _pool(args.workers, args.tokenizer) as pool:
            results = ordered_map(pool, tokenise_task, tasks(docs, text_key), ahead=2 * args.workers) if pool \
                else (tokenise_task(t) for t in tasks(docs, text_key))
            for tokens, n_docs in results:
                writer.add(tokens, n_docs)
                bar.update(len(tokens))
        writer.flush()
        seconds = time.perf_counter() - t0
        total = sum(s["tokens"] for s in writer.shards)
        if total == 0:
            raise ConfigError(f"prepare: source {' '.join(args.source)} ({args.split}) holds no text "
                              f"under key {text_key!r}; check --text-key / --split")
        index = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_name(tokenizer),
                 "tokenizer_arg": args.tokenizer, "vocab_hash": vocab_hash(tokenizer),
                 "eos_id": tokenizer.eos_token_id, "dtype": dtype.name, "source": list(args.source),
                 "split": args.split, "documents": sum(s["documents"] for s in writer.shards), "tokens": total,
                 "shards": writer.shards, "workers": args.workers, "seconds": round(seconds, 3)}
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**index, "tokens_per_s": total / max(seconds, 1e-9)}


def ordered_map(pool, fn, items, ahead: int):
    """`fn` over `items` on the pool, results in input order, at most `ahead` tasks in flight (Pool.imap
    would read the whole source into its task queue first)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _NoBar:
    def update(self, _n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(unit="tok", unit_scale=True, desc="tokenising", dynamic_ncols=True)


class _pool:
    """A pool of `workers` tokeniser processes, or None for one worker (tokenise in this process).

    Workers come from a forkserver (a small process that imported this module once), not a fork of the caller,
    which may be large (a notebook, a test session) and whose fork can fail for memory."""

    def __init__(self, workers: int, model: str):
        self.workers, self.model, self.pool = workers, model, None

    def __enter__(self):
        if self.workers == 1:
            _init_worker(self.model)
            return None
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["npt_ds.data.prepare"])  # imported once, not per worker
        self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.model,))
        return self.pool

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()
        return False


def run_prepare(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the worker processes are the parallelism
    index = prepare(args)
    line = (f"prepared {index['documents']:,} documents, {index['tokens']:,} tokens ({index['dtype']}) in "
            f"{len(index['shards'])} shard(s) -> {args.out}; {index['tokens_per_s']:,.0f} tokens/s with "
            f"{args.workers} worker(s)")
    if args.seq_len:
        windows = sum(s["tokens"] // args.seq_len for s in index["shards"])
        line += f"; {windows:,} windows of {args.seq_len}"
    print(line)
    return 0
