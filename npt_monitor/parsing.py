"""Metric-stream model: parse JSONL lines into records and fold them into a RunState.

Pure Python + numpy, no Textual.  One line of ``metrics.jsonl`` is one flat JSON
object written by the trainer (rank 0).  Any key may be missing; unknown numeric
keys are kept as series (and offered in the metric picker).

Lines are parsed with orjson; the few it rejects are retried with the stdlib
``json``, which also accepts the ``NaN``/``Infinity`` tokens Python's json
writes.  Those lines are flagged on the batch (``maybe_nonfinite``) so the
alert engine can check them for non-finite values.

A batch's columns are read record by record for the records of its most common
key set (the train lines: each dict is visited once, not once per key) and key
by key for the few others; they become numpy arrays once per key and batch.

Memory stays bounded for huge files: every numeric key gets a :class:`Series`
that stores at most ``max_points`` points; when full it drops every other point
and doubles its stride (the newest value is always kept exactly).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from itertools import compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import orjson

__all__ = ["CorruptLine", "HeaderInfo", "Batch", "RunState", "Series", "format_eta", "format_rate", "metrics_path",
           "parse_line", "parse_lines"]

#: keys that are not metrics (never plotted); ``run/*`` keys are metadata too
NON_METRIC_KEYS = frozenset({"step", "time"})
LAYER_KEY = re.compile(r"^(eval/)?layer/(\d+)/(.+)$")  # train values, and held-out ones as field "eval/<name>"
LAYER_FIELDS = ("direct_mse", "v_a_norm", "v_b_norm", "v_a_attn_sim", "eval/direct_mse_teacher_in",
                "eval/direct_mse_student_in")
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


def _as_int(v: object) -> int | None:
    if type(v) is int:
        return v
    if type(v) is float and _isfinite(v) and v == int(v):
        return int(v)
    return None


def _last_at(col: Sequence, ok=None) -> tuple[object, int]:
    """The last ``v`` of ``col`` that is not ``None`` and passes ``ok``, and its index (``(None, -1)``: none)."""
    for j in range(len(col) - 1, -1, -1):
        v = col[j]
        if v is not None and (ok is None or ok(v)):
            return v, j
    return None, -1


def _last(col: Sequence, ok=None) -> object:
    return _last_at(col, ok)[0]


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
            for s in map(_as_int, col):
                if s is not None:
                    cur = have = s
                steps.append(cur)
        self.steps, self.last_step = steps, have
        self.x = np.array(steps, dtype=float)
        self.events = [e if type(e) is str and e else TRAIN_EVENT for e in self.column("event")]
        self.is_train = np.array([e == TRAIN_EVENT for e in self.events], dtype=bool)
        return self

    def keys(self) -> set[str]:
        """Every key that occurs in the batch (a fresh set)."""
        return set().union(*self.records)

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
        text, at = _last_at(col, lambda v: type(v) is str) if str in kinds else (None, -1)
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
        """``(indices, values)`` of the finite numeric ``key`` values on train lines.  Needs :meth:`prepare`."""
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


class Series:
    """Step-indexed numeric series with bounded memory (stride doubling).

    Only finite values are stored (a plot cannot draw NaN); ``last_x``/``last_y``
    and ``count`` always reflect the newest value, finite or not.  The points
    live in two preallocated float arrays; ``xs``/``ys`` are views of the filled part.
    """

    __slots__ = ("_x", "_y", "_n", "cap", "stride", "_skip", "last_x", "last_y", "count")

    def __init__(self, cap: int = 20_000) -> None:
        self.cap = max(16, cap)
        self._x, self._y, self._n = np.empty(self.cap), np.empty(self.cap), 0
        self.stride = 1
        self._skip = 0  # values since the last stored one
        self.last_x = -math.inf
        self.last_y = math.nan
        self.count = 0

    xs = property(lambda self: self._x[: self._n])
    ys = property(lambda self: self._y[: self._n])

    def __len__(self) -> int:
        return self._n

    def append(self, x: float, y: float) -> None:
        self.extend([x], [y])

    def extend(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        """Append many points, as many :meth:`append` calls would.  Where ``xs``
        goes back (the trainer restarted from an earlier step) the stale tail is dropped."""
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        cuts = [0, *((xs[1:] < xs[:-1]).nonzero()[0] + 1).tolist(), len(xs)]
        for a, b in zip(cuts, cuts[1:]):
            if a < b:
                self._extend(xs[a:b], ys[a:b])

    def _extend(self, xs: np.ndarray, ys: np.ndarray) -> None:
        if xs[0] < self.last_x:  # rewind
            self._n = int(np.searchsorted(self.xs, xs[0], "left"))
        self.last_x, self.last_y = float(xs[-1]), float(ys[-1])
        self.count += len(xs)
        finite = np.isfinite(ys)
        if not finite.all():
            xs, ys = xs[finite], ys[finite]
        while len(xs):  # store every stride-th value; halve (and double the stride) when full
            s, first = self.stride, self.stride - 1 - self._skip
            px, py = xs[first::s], ys[first::s]
            room = self.cap - self._n
            if len(px) < room:
                self._put(px, py)
                self._skip = (self._skip + len(xs)) % s
                return
            self._put(px[:room], py[:room])
            m = (self._n + 1) // 2
            self._x[:m], self._y[:m] = self._x[: self._n : 2].copy(), self._y[: self._n : 2].copy()
            self._n, self.stride, self._skip = m, 2 * s, 0
            xs, ys = xs[first + (room - 1) * s + 1 :], ys[first + (room - 1) * s + 1 :]

    def _put(self, px: np.ndarray, py: np.ndarray) -> None:
        n, k = self._n, len(px)
        self._x[n : n + k], self._y[n : n + k] = px, py
        self._n = n + k

    def window(
        self, x0: float | None = None, x1: float | None = None, max_points: int = 400
    ) -> tuple[list[float], list[float]]:
        """Points with x0 <= x <= x1 (plus the newest finite one), reduced to about
        ``max_points``: each bucket keeps its min and max, so spikes stay visible."""
        xs, ys = self.xs, self.ys
        lo = 0 if x0 is None else int(np.searchsorted(xs, x0, "left"))
        hi = len(xs) if x1 is None else int(np.searchsorted(xs, x1, "right"))
        n = hi - lo
        if n > max_points and max_points >= 4:
            buckets = max_points // 2
            edges = (lo + np.arange(buckets + 1) * n // buckets).tolist()
            keep: list[int] = []
            for a, e in zip(edges, edges[1:]):
                if e > a:
                    chunk = ys[a:e]
                    keep += sorted({a + int(chunk.argmin()), a + int(chunk.argmax())})
            px, py = xs[keep].tolist(), ys[keep].tolist()
        else:
            px, py = xs[lo:hi].tolist(), ys[lo:hi].tolist()
        lx, ly = self.last_x, self.last_y
        if self.count and _isfinite(ly) and (not px or px[-1] < lx) and (x0 is None or lx >= x0) and (
                x1 is None or lx <= x1):
            px.append(lx)
            py.append(ly)
        return px, py


@dataclass(frozen=True)
class HeaderInfo:
    """What the header shows; frozen so a reactive only refreshes on change."""

    name: str = ""
    step: int | None = None
    total_steps: int | None = None
    stage: str | None = None
    mixing_ratio: float | None = None
    kd_weight: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    skipped_steps: int = 0
    lines: int = 0
    corrupt: int = 0
    waiting: bool = False


def format_eta(seconds: float | None) -> str:
    if seconds is None or not _isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_rate(v: float | None) -> str:
    if v is None or not _isfinite(v):
        return "--"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.0f}"


def fmt_num(v: float | None, digits: int = 4) -> str:
    """Compact number for tables/headers: '--' for missing, 'NaN'/'Inf' kept visible."""
    if v is None:
        return "--"
    if not _isfinite(v):
        return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{max(1, digits - 2)}e}"
    return f"{v:.{digits}g}"


class RunState:
    """Everything the monitor knows about one run, folded from its records."""

    def __init__(self, path: str | Path | None = None, max_points: int = 20_000) -> None:
        self.path = Path(path) if path is not None else None
        self.max_points = max_points
        self.reset()

    def reset(self) -> None:
        """Forget everything (file truncated or replaced)."""
        self.name: str | None = None
        self.total_steps: int | None = None
        self.step: int | None = None
        self.latest: dict[str, float] = {}
        self.strings: dict[str, str] = {}
        self.series: dict[str, Series] = {}
        self.clock = Series(self.max_points)  # the `time` of train lines by step: the plots' wall-time axis
        self.events: dict[str, int] = {}
        self.n_lines = 0  # highest line number seen (incl. blank/corrupt)
        self.n_records = 0
        self.corrupt_count = 0
        self.corrupt_samples: list[CorruptLine] = []
        self.first_time: tuple[float, int] | None = None  # (time, step) of first timed train line
        self.last_time: tuple[float, int] | None = None
        self.version = 0  # bumped on every change; widgets compare it
        self._layer_cache: dict[str, tuple[int, str] | None] = {}

    # -- folding -----------------------------------------------------------------
    def ingest(self, batch: Batch) -> None:
        """Fold a batch of records, one numpy column per key."""
        n = len(batch)
        if not n:
            return
        batch.prepare(self.step)
        x = batch.x
        self.n_records += n
        self.n_lines = max(self.n_lines, batch.line_nos[-1])
        for e, c in Counter(batch.events).items():  # (first-seen order, like a loop)
            self.events[e] = self.events.get(e, 0) + c
        if batch.last_step is not None:
            self.step = batch.last_step
        keys = batch.keys()
        if "run/total_steps" in keys:
            total = _last(batch.column("run/total_steps"), lambda v: _as_int(v) is not None)
            if total is not None:
                self.total_steps = _as_int(total)
        if "time" in keys:
            self._fold_time(batch)
        for key in keys - NON_METRIC_KEYS - {"event"}:
            if key.startswith("run/"):  # start-line metadata: latest value only
                v = _last(batch.column(key))
                if v is not None:
                    (self.strings if type(v) is str else self.latest)[key] = v
                continue
            idx, ys, last, text = batch.numeric(key)
            if len(ys):
                if key not in self.series:
                    self.series[key] = Series(self.max_points)
                self.series[key].extend(x if idx is None else x[idx], ys)
                self.latest[key] = last
            if text is not None:  # a text key (curriculum/stage, ...)
                self.strings[key] = text
        name = self.strings.get("run/name")
        if name:
            self.name = name
        self.version += 1

    def _fold_time(self, batch: Batch) -> None:
        """The wall-time axis (``clock``) and the first/last timed train lines (ETA)."""
        idx, ts, _, _ = batch.numeric("time")
        self.clock.extend(batch.x if idx is None else batch.x[idx], ts)
        t = np.full(len(batch), math.nan)
        t[slice(None) if idx is None else idx] = ts
        timed = (np.isfinite(t) & batch.is_train).nonzero()[0]
        train = batch.is_train.nonzero()[0]
        if len(timed) and timed[-1] == train[-1]:  # the newest train line has a time
            i = int(timed[-1])
            self.last_time = (float(t[i]), batch.steps[i])  # type: ignore[index]
            if self.first_time is None:
                i = int(timed[0])
                self.first_time = (float(t[i]), batch.steps[i])  # type: ignore[index]

    def note_corrupt(self, bad: CorruptLine, keep: int = 100) -> None:
        self.corrupt_count += 1
        if bad.line_no > self.n_lines:
            self.n_lines = bad.line_no
        if len(self.corrupt_samples) < keep:
            self.corrupt_samples.append(bad)
        self.version += 1

    # -- views -------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.path is None:
            return "run"
        return self.path.parent.name if self.path.name == "metrics.jsonl" and self.path.parent.name else self.path.stem

    def numeric_keys(self) -> list[str]:
        return sorted(self.series)

    def eta_seconds(self) -> float | None:
        eta = self.latest.get("eta_s")
        if eta is not None and _isfinite(eta):
            return eta
        # fall back to the trainer's own clock (the `time` field), never the wall clock
        if self.total_steps and self.first_time and self.last_time and self.step is not None:
            (t0, s0), (t1, s1) = self.first_time, self.last_time
            if t1 > t0 and s1 > s0:
                return max(0.0, (self.total_steps - self.step) * (t1 - t0) / (s1 - s0))
        return None

    def header(self, waiting: bool = False) -> HeaderInfo:
        lt, skipped = self.latest, self.latest.get("skipped_steps")
        return HeaderInfo(
            name=self.display_name, step=self.step, total_steps=self.total_steps,
            stage=self.strings.get("curriculum/stage"), mixing_ratio=lt.get("curriculum/mixing_ratio"),
            kd_weight=lt.get("kd/weight"), tokens_per_s=lt.get("tokens_per_s"), eta_s=self.eta_seconds(),
            skipped_steps=int(skipped) if skipped is not None and _isfinite(skipped) else 0,
            lines=self.n_lines, corrupt=self.corrupt_count, waiting=waiting,
        )

    def _layer_of(self, key: str) -> tuple[int, str] | None:
        cache = self._layer_cache
        if key not in cache:
            m = LAYER_KEY.match(key)
            cache[key] = (int(m.group(2)), (m.group(1) or "") + m.group(3)) if m else None
        return cache[key]

    def layers(self) -> dict[int, dict[str, float]]:
        """Latest per-layer values: {layer index: {field: value}}; held-out (eval) fields are "eval/<name>"."""
        out: dict[int, dict[str, float]] = {}
        for key, v in self.latest.items():
            lf = self._layer_of(key)
            if lf is not None:
                out.setdefault(lf[0], {})[lf[1]] = v
        return dict(sorted(out.items()))
