"""Parsing the metric stream: JSONL lines into :class:`Batch` records, corrupt lines reported one by one.

Pure Python + numpy, no Textual.  One line of ``metrics.jsonl`` is one flat JSON object written by the
trainer (rank 0).  Lines are parsed with orjson; the few it rejects are retried with the stdlib ``json``,
which also accepts the ``NaN``/``Infinity`` tokens Python's json writes.  Those lines are flagged on the
batch (``maybe_nonfinite``) so the alert engine can check them for non-finite values.

A batch's columns are read record by record for the records of its most common key set (the train lines:
each dict is visited once, not once per key) and key by key for the few others; they become numpy arrays
once per key and batch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import orjson

__all__ = ["CorruptLine", "Batch", "metrics_path", "parse_line", "parse_lines"]

#: keys that are not metrics (never plotted); ``run/*`` keys are metadata too
NON_METRIC_KEYS = frozenset({"step", "time"})
TRAIN_EVENT = "train"

_isfinite = math.isfinite


def metrics_path(arg: str | Path) -> Path:
    """A RUN_DIR argument means RUN_DIR/metrics.jsonl; anything else is the file itself."""
    p = Path(arg)
    if p.is_dir() or (not p.exists() and p.suffix == ""):
        return p / "metrics.jsonl"
    return p


class CorruptLine(ValueError):
    """A line that is not JSON or not a JSON object."""

    def __init__(self, line_no: int, reason: str) -> None:
        super().__init__(f"line {line_no}: {reason}")
        self.line_no = line_no
        self.reason = reason


def as_int(v: object) -> int | None:
    if type(v) is int:
        return v
    if type(v) is float and _isfinite(v) and v == int(v):
        return int(v)
    return None


def last_at(col: Sequence, ok=None) -> tuple[object, int]:
    """The last ``v`` of ``col`` that is not ``None`` and passes ``ok``, and its index (``(None, -1)``: none)."""
    for j in range(len(col) - 1, -1, -1):
        v = col[j]
        if v is not None and (ok is None or ok(v)):
            return v, j
    return None, -1


def last_of(col: Sequence, ok=None) -> object:
    return last_at(col, ok)[0]


class Batch:
    """Consecutive parsed lines, read as columns.

    ``records[i]`` is the JSON object of line ``line_nos[i]``; ``maybe_nonfinite``
    lists the indices of the records that may hold ``NaN``/``Infinity`` (those
    orjson rejected; every record by default): the alerts check them with
    :meth:`nonfinite_keys`, and :meth:`numeric` trusts that no other record has a NaN.
    :meth:`prepare` resolves ``steps`` (a line without ``step`` belongs to the
    last step seen) and ``events`` (default ``"train"``).
    """

    def __init__(self, records: list[dict] | None = None, line_nos: list[int] | None = None,
                 maybe_nonfinite: list[int] | None = None) -> None:
        self.records = records if records is not None else []
        n = len(self.records)
        self.line_nos = line_nos if line_nos is not None else list(range(1, n + 1))
        self.maybe_nonfinite = maybe_nonfinite if maybe_nonfinite is not None else list(range(n))
        self.steps: list[int] | None = None
        self.x = np.empty(0)  # steps as floats (a Series' x)
        self.events: list[str] = []
        self.last_step: int | None = None
        self.is_train = np.empty(0, dtype=bool)  # which records are train lines
        self._cols: dict[str, list] = {}
        self._num: dict[str, tuple] = {}
        self._shape_cache: tuple | None = None
        self._keys: frozenset[str] | None = None
        self.memo: dict = {}  # values derived from the batch that several detectors need (computed once)

    @classmethod
    def from_dicts(cls, records: Iterable[dict], first_line_no: int = 1) -> "Batch":
        recs = list(records)
        return cls(recs, list(range(first_line_no, first_line_no + len(recs))))

    def __len__(self) -> int:
        return len(self.records)

    def prepare(self, last_step: int | None) -> "Batch":
        """Resolve steps/events, carrying ``last_step`` in.  Idempotent."""
        if self.steps is not None:
            return self
        col = self.column("step")
        if col and set(map(type, col)) == {int}:  # every line has an int step
            steps, have = list(col), col[-1]
        else:
            steps, have = [], last_step
            cur = 0 if last_step is None else last_step
            for s in map(as_int, col):
                if s is not None:
                    cur = have = s
                steps.append(cur)
        self.steps, self.last_step = steps, have
        self.x = np.array(steps, dtype=float)
        self.events = [e if type(e) is str and e else TRAIN_EVENT for e in self.column("event")]
        self.is_train = np.array([e == TRAIN_EVENT for e in self.events], dtype=bool)
        return self

    def keys(self) -> frozenset[str]:
        """Every key that occurs in the batch (cached)."""
        if self._keys is None:
            self._keys = frozenset().union(*self.records)
        return self._keys

    def precompute(self) -> "Batch":
        """Build every column now (the tailer thread does this, off the UI thread)."""
        for key in self.keys():
            self.numeric(key)
        return self

    def column(self, key: str) -> list:
        """Values of ``key`` per record (``None`` where missing); cached."""
        col = self._cols.get(key)
        if col is None:
            (_, cols), (rest_at, rest) = self._shape()
            if rest is self.records or len(rest) > len(rest_at) // 4 + 8 or key not in cols:
                col = list(map(dict.get, self.records, repeat(key)))
            else:  # the common shape's values, the few others put in at their places
                col = list(cols[key])
                for i, rec in zip(rest_at.tolist(), rest):
                    col.insert(i, rec.get(key))
            self._cols[key] = col
        return col

    def numeric(self, key: str) -> tuple[np.ndarray | None, np.ndarray, object, str | None]:
        """``(idx, ys, last, text)``: the indices of the records whose ``key`` is a
        number (``None``: every record), those numbers as floats, the last one as
        read, and the last text value of ``key`` (``None`` if none); cached.
        A missing key or a null is no number, nor is a bool."""
        got = self._num.get(key)
        if got is None:
            (at, cols), (rest_at, rest) = self._shape()
            parts = [(at, cols.get(key, ())), (rest_at, self._column_of(rest, key))]
            got = self._num[key] = self._merge([self._numbers(pos, col) for pos, col in parts if len(col)])
        return got

    def _shape(self) -> tuple[tuple[np.ndarray, dict[str, tuple]], tuple[np.ndarray, list[dict]]]:
        """Memory-friendly columns: the records of the most common key set (most lines of a stream, the
        train lines) are read once each, all their keys at a time; the rest key by key.
        ``((positions, {key: values}), (positions of the rest, the rest))``.

        The key set is the first record's of the most common length; a record with as many keys and
        all of them has exactly that key set."""
        if self._shape_cache is None:
            recs, n = self.records, len(self.records)
            lengths = list(map(len, recs))
            common = Counter(lengths).most_common(1)[0][0] if n else 0
            keys = tuple(recs[lengths.index(common)]) if n else ()
            same = [k == common for k in lengths]
            members = recs if all(same) else list(compress(recs, same))
            try:
                rows = list(map(itemgetter(*keys), members)) if len(keys) > 1 else None
            except KeyError:  # as many keys, other ones
                rows = None
            if rows is None:
                self._shape_cache = (np.empty(0, dtype=np.int64), {}), (np.arange(n), recs)
            else:
                mask = np.asarray(same, dtype=bool)
                rest = np.flatnonzero(~mask)
                self._shape_cache = ((np.flatnonzero(mask), dict(zip(keys, zip(*rows)))),
                                     (rest, [recs[i] for i in rest.tolist()]))
        return self._shape_cache

    def _column_of(self, records: list[dict], key: str) -> list:
        return self.column(key) if records is self.records else list(map(dict.get, records, repeat(key)))

    def _numbers(self, pos: np.ndarray, col: Sequence) -> tuple:
        """For the values ``col`` of the records at ``pos``: (positions of the numbers, the numbers,
        (the last number as read, its position), (the last text value, its position))."""
        kinds = set(map(type, col))
        nums = {t for t in kinds if issubclass(t, (int, float)) and t is not bool}
        if kinds == nums:  # a number on every line (the common case)
            sel, ys = np.arange(len(col)), np.array(col, dtype=float)
        elif kinds - nums == {type(None)}:  # numbers and gaps (missing or null)
            ys = np.array(col, dtype=float)  # a gap reads as NaN
            ok = ~np.isnan(ys)
            if self.maybe_nonfinite:  # the only records that can hold a NaN value (a point, not a gap)
                may = np.flatnonzero(np.isin(pos, self.maybe_nonfinite))
                ok[may] = [col[j] is not None for j in may.tolist()]
            sel = ok.nonzero()[0]
            ys = ys[sel]
        else:  # text, bools, lists, ... mixed in (or no number at all)
            sel = np.array([j for j, v in enumerate(col) if type(v) in nums], dtype=np.int64)
            ys = np.array([col[j] for j in sel.tolist()], dtype=float)
        last = (col[sel[-1]], int(pos[sel[-1]])) if len(ys) else (None, -1)
        text, at = last_at(col, lambda v: type(v) is str) if str in kinds else (None, -1)
        return pos[sel], ys, last, (text, int(pos[at]) if at >= 0 else -1)

    def _merge(self, parts: list[tuple]) -> tuple[np.ndarray | None, np.ndarray, object, str | None]:
        """One column from the parts :meth:`_numbers` made of it (disjoint positions)."""
        n = len(self.records)
        if len(parts) == 1:
            idx, ys = parts[0][0], parts[0][1]
        elif parts:
            valid, full = np.zeros(n, dtype=bool), np.empty(n)
            for pos, part, _, _ in parts:
                valid[pos] = True
                full[pos] = part
            idx = valid.nonzero()[0]
            ys = full[idx]
        else:
            idx, ys = np.empty(0, dtype=np.int64), np.empty(0)
        last = max((p[2] for p in parts), key=lambda t: t[1], default=(None, -1))[0]
        text = max((p[3] for p in parts), key=lambda t: t[1], default=(None, -1))[0]
        return (None if len(idx) == n else idx), ys, last, text

    def train_finite_columns(self, key: str) -> tuple[Sequence[int], list]:
        """``(indices, values)`` of the finite numeric ``key`` values on train lines (cached: do not change
        them).  Needs :meth:`prepare`."""
        got = self.memo.get(("train_finite", key))
        if got is None:
            got = self.memo[("train_finite", key)] = self._train_finite(key)
        return got

    def _train_finite(self, key: str) -> tuple[Sequence[int], list]:
        idx, ys, _, _ = self.numeric(key)
        idx = np.arange(len(self)) if idx is None else idx
        idx = idx[np.isfinite(ys) & self.is_train[idx]].tolist()
        col = self.column(key)
        return idx, [col[i] for i in idx]

    def nonfinite_keys(self, i: int) -> list[str]:
        return [
            k for k, v in self.records[i].items() if type(v) is float and not _isfinite(v) and k not in NON_METRIC_KEYS
        ]


def parse_line(raw: bytes | str, line_no: int = 0) -> dict | None:
    """Parse one line.  Blank lines give ``None``; bad lines raise :class:`CorruptLine`."""
    batch, corrupt = parse_lines([raw], line_no)
    if corrupt:
        raise corrupt[0]
    return batch.records[0] if batch.records else None


def parse_lines(lines: Iterable[bytes | str], first_line_no: int = 1) -> tuple[Batch, list[CorruptLine]]:
    """Parse consecutive lines numbered from ``first_line_no`` (blank lines are skipped)."""
    if type(lines) is not list:
        lines = list(lines)
    try:  # the common case, every line a JSON object orjson accepts: no per-line Python
        records = list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        pass
    else:
        if set(map(type, records)) <= {dict}:
            return Batch(records, list(range(first_line_no, first_line_no + len(records))), []), []
    records = []
    line_nos: list[int] = []
    fallback: list[int] = []  # the records orjson rejected: NaN/Infinity (or 1e400, ...) may be in them
    corrupt: list[CorruptLine] = []
    for k, raw in enumerate(lines, first_line_no):
        strict = True
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            strict = False
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                if raw.strip():
                    msg = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                    corrupt.append(CorruptLine(k, f"not JSON ({msg})"))
                continue
        if type(obj) is not dict:
            corrupt.append(CorruptLine(k, f"not a JSON object ({type(obj).__name__})"))
            continue
        if not strict:
            fallback.append(len(records))
        records.append(obj)
        line_nos.append(k)
    return Batch(records, line_nos, fallback), corrupt
