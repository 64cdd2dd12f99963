"""Text -> packed token windows: HF `datasets` streaming, per-rank sharding, resumable position.

Documents are tokenised, joined with EOS and cut into fixed windows of seq_len tokens.  Window j
of the global stream belongs to rank j % world_size, so every rank sees a disjoint, deterministic
shard.  The position (batches consumed, epoch) is saved in checkpoints; resuming replays the
stream up to it, so the data order after a resume equals an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .assets import shakespeare_texts
from .config import ConfigError, DataConfig

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


def _stream_files(paths: list[Path], text_key: str):
    import datasets

    builder = BUILDERS[paths[0].suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                               streaming=True, **kwargs)
    return ds, ("text" if builder == "text" else text_key)


def document_source(cfg: DataConfig, split: str):
    """(iterable dataset, text column) for 'train' or 'eval'."""
    if cfg.source == "shakespeare":
        train, held = shakespeare_split(cfg.eval_holdout)
        return _stream_files(train if split == "train" else held, "text")
    if cfg.source == "files":
        files = cfg.files if split == "train" else (cfg.eval_files or cfg.files[-1:])
        return _stream_files(_check_files("data.files" if split == "train" else "data.eval_files", files),
                             cfg.text_key)
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split if split == "train" else cfg.eval_split,
                                   streaming=True)
    except Exception as exc:  # noqa: BLE001 - surface one line naming the key
        raise ConfigError(f"data.source {cfg.source!r} could not be loaded ({type(exc).__name__}); "
                          "use 'shakespeare', 'files' with data.files, or a reachable hub dataset") from None
    return ds, cfg.text_key


def token_windows(ds, text_key: str, tokenizer, seq_len: int, seed: int = 0, epoch: int = 0,
                  shuffle_buffer: int = 0) -> Iterator[list[int]]:
    """Pack documents (joined by EOS) into windows of exactly seq_len tokens."""
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed + epoch, buffer_size=shuffle_buffer)
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    for row in ds:
        text = row.get(text_key)
        if not text:
            continue
        buf.extend(tokenizer(text)["input_ids"])
        if eos is not None:
            buf.append(eos)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            del buf[:seq_len]


class PackedBatches:
    """Endless (micro_batch, seq_len) LongTensor batches for one rank, with a resumable position."""

    def __init__(self, cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.cfg, self.tokenizer, self.rank, self.world = cfg, tokenizer, rank, world_size
        self.seed = seed
        self.batches_consumed = 0
        self.epoch = 0
        self._it: Iterator[torch.Tensor] | None = None

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed, self.epoch = 0, 0
        self._it = None
        target = int(state.get("batches_consumed", 0))
        for _ in range(target):  # replay: deterministic, so the next batch matches an uninterrupted run
            next(self)

    def _epoch_batches(self) -> Iterator[torch.Tensor]:
        ds, key = document_source(self.cfg, "train")
        windows, batch = token_windows(ds, key, self.tokenizer, self.cfg.seq_len, self.seed, self.epoch,
                                       self.cfg.shuffle_buffer), []
        for j, window in enumerate(windows):
            if j % self.world != self.rank:
                continue
            batch.append(window)
            if len(batch) == self.cfg.micro_batch_size:
                yield torch.tensor(batch, dtype=torch.long)
                batch = []

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_batches()
            try:
                batch = next(self._it)
                self.batches_consumed += 1
                return batch
            except StopIteration:
                self._it = None
                self.epoch += 1
        raise ConfigError("data: the training corpus is shorter than one batch; lower data.seq_len or "
                          "data.micro_batch_size, or add data")


def eval_batches(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1) -> list[torch.Tensor]:
    """The first eval_batches·world_size windows of the held-out text, this rank's share.

    Every rank gets the same number of batches (ZeRO-3 needs every rank in every forward)."""
    ds, key = document_source(cfg, "eval")
    want = cfg.eval_batches * world_size * batch_size
    windows = []
    for w in token_windows(ds, key, tokenizer, cfg.eval_seq_len):
        windows.append(w)
        if len(windows) == want:
            break
    if len(windows) < want:
        raise ConfigError(f"data: held-out text has only {len(windows)} windows of {cfg.eval_seq_len} tokens; "
                          "lower data.eval_batches or data.eval_seq_len")
    mine = windows[rank::world_size]
    return [torch.tensor(mine[i:i + batch_size], dtype=torch.long) for i in range(0, len(mine), batch_size)]
