"""A prepared corpus (written by `npt-ds prepare`): memory-mapped token shards + index.json, read by window.

Layout of a prepared dir::

    index.json          format, version, tokenizer name + vocabulary hash, EOS id, dtype, shard list
    shard-00000.npy     one flat token stream (documents joined by EOS), uint16 or uint32
    ...

Windows of `seq_len` tokens are cut from each shard (a shard's last partial window is dropped), so window w
is addressed in O(1) from the cumulative per-shard window counts; nothing is read until a window is.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError

FORMAT, VERSION = "npt-ds-prepared", 1
INDEX = "index.json"


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def vocab_hash(tokenizer) -> str:
    """A short hash of the vocabulary (token -> id) and EOS id: equal hashes tokenise alike."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else \
        {f"<{type(tokenizer).__name__}:{i}>": i for i in range(int(tokenizer.vocab_size))}
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(f"{blob}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class PreparedCorpus:
    """An opened prepared dir, validated; `windows(seq_len)` gives a random-access window view."""

    path: Path
    index: dict
    shards: list  # memory-mapped np arrays, one per shard

    @classmethod
    def open(cls, path: str | Path, key: str = "data.path") -> "PreparedCorpus":
        root = Path(path).expanduser()
        index_file = root / INDEX
        if not index_file.is_file():
            raise ConfigError(f"{key}: {str(root)!r} is not a prepared dir (no {INDEX}); "
                              "create it with `npt-ds prepare SOURCE --tokenizer MODEL --out DIR`")
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: {index_file} is damaged ({type(exc).__name__}); re-run npt-ds prepare") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ConfigError(f"{key}: {root} has format {index.get('format')!r} version {index.get('version')!r}, "
                              f"this npt-ds reads {FORMAT!r} version {VERSION}; re-run npt-ds prepare")
        shards = []
        for shard in index["shards"]:
            file = root / shard["file"]
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{key}: shard {file} is missing or damaged ({type(exc).__name__}); "
                                  "re-run npt-ds prepare") from None
            if array.shape != (shard["tokens"],) or array.dtype != np.dtype(index["dtype"]):
                raise ConfigError(f"{key}: shard {file} holds {array.shape[0]} {array.dtype} tokens, the index "
                                  f"says {shard['tokens']} {index['dtype']} (truncated?); re-run npt-ds prepare")
            shards.append(array)
        return cls(root, index, shards)

    @property
    def tokens(self) -> int:
        return int(self.index["tokens"])

    def check_tokenizer(self, tokenizer, key: str = "data.path") -> None:
        """One line naming both tokenizers when the corpus was prepared with another vocabulary."""
        mine = vocab_hash(tokenizer)
        if self.index["vocab_hash"] != mine:
            raise ConfigError(f"{key}: {self.path} was prepared with tokenizer {self.index['tokenizer']!r} "
                              f"(vocab {self.index['vocab_hash']}) but the model's is {tokenizer_name(tokenizer)!r} "
                              f"(vocab {mine}); re-run npt-ds prepare --tokenizer for this model")

    def windows(self, seq_len: int, key: str = "data.seq_len") -> "WindowView":
        counts = np.array([len(s) // seq_len for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise ConfigError(f"{key}: {seq_len} is longer than every shard of {self.path} (longest "
                              f"{longest} tokens); lower {key} to at most {longest} or prepare more text")
        return WindowView(self, seq_len, np.concatenate([[0], np.cumsum(counts)]))


@dataclass
class WindowView:
    """Windows of one length over a prepared corpus: `read(w)` is window w as an int64 array."""

    corpus: PreparedCorpus
    seq_len: int
    starts: np.ndarray  # cumulative window counts per shard, starts[0] = 0
    reads: int = 0  # windows read so far (a resume reads none before its cursor)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, w: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, w, side="right")) - 1
        offset = (w - int(self.starts[shard])) * self.seq_len
        self.reads += 1
        return np.asarray(self.corpus.shards[shard][offset:offset + self.seq_len], dtype=np.int64)
