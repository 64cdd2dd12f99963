"""Metric-stream model: parse JSONL lines into records and fold them into a RunState.

Pure Python, no Textual.  One line of ``metrics.jsonl`` is one flat JSON object
written by the trainer (rank 0).  Any key may be missing; unknown numeric keys are
kept as series (and offered in the metric picker).  ``NaN``/``Infinity`` tokens
(Python's json writes them) parse to non-finite floats and are flagged on the
record so the alert engine can fire.

Memory stays bounded for huge files: every numeric key gets a :class:`Series`
that stores at most ``max_points`` points; when full it drops every other point
and doubles its stride (the newest value is always kept exactly).

Speed (a 100k-line file, ~93 MB, loads in about a second): lines are decoded
thousands per ``json`` call (:func:`parse_lines`, with the same result as one call
per line), and a :class:`Batch` is folded key by key, with C-level loops
(``map``/``itemgetter``, ``array``) instead of Python loops over the records.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate, compress, islice, repeat
from operator import eq as _eq, itemgetter, le as _le, ne as _ne
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "CorruptLine",
    "HeaderInfo",
    "Batch",
    "RunState",
    "Series",
    "format_eta",
    "format_rate",
    "metrics_path",
    "parse_line",
    "parse_lines",
]

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


class Batch:
    """Consecutive parsed lines in columnar-friendly form.

    ``records[i]`` is the JSON object of line ``line_nos[i]``; ``maybe_nonfinite``
    lists the indices whose raw text contains ``NaN``/``Infinity`` (a cheap
    substring test; :meth:`nonfinite_keys` does the exact check).
    :meth:`prepare` resolves ``steps`` (a line without ``step`` belongs to the
    last step seen) and ``events`` (default ``"train"``).
    """

    __slots__ = (
        "records", "line_nos", "maybe_nonfinite", "steps", "events", "last_step", "monotonic",
        "_cols", "_keys", "_runs", "_xs",
    )

    def __init__(
        self,
        records: list[dict] | None = None,
        line_nos: list[int] | None = None,
        maybe_nonfinite: list[int] | None = None,
    ) -> None:
        self.records = records if records is not None else []
        self.line_nos = line_nos if line_nos is not None else list(range(1, len(self.records) + 1))
        if maybe_nonfinite is None:  # built from dicts: check every record
            maybe_nonfinite = list(range(len(self.records)))
        self.maybe_nonfinite = maybe_nonfinite
        self.steps: list[int] | None = None
        self.events: list[str] = []
        self.last_step: int | None = None
        self.monotonic = True
        self._cols: dict[str, list] = {}
        self._keys: set[str] | None = None
        self._runs: list[tuple[int, int, dict[str, list]]] | None = None  # see _runs_of
        self._xs: dict[tuple[int, ...] | None, tuple[list[int], array]] = {}

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
            steps = list(col)
            have = steps[-1]
        else:
            steps = []
            append = steps.append
            have = last_step
            cur = 0 if last_step is None else last_step
            for s in col:
                if type(s) is not int:
                    s = _as_int(s)
                if s is not None:
                    cur = have = s
                append(cur)
        self.steps = steps
        self.last_step = have
        self.events = [e if type(e) is str and e else TRAIN_EVENT for e in self.column("event")]
        self.monotonic = all(map(_le, steps, islice(steps, 1, None)))
        return self

    def keys(self) -> set[str]:
        """Every key that occurs in the batch (a fresh set)."""
        if self._keys is None:
            self._build_columns()
        return set(self._keys)  # type: ignore[arg-type]

    def precompute(self) -> "Batch":
        """Do the per-key work now (the tailer thread does this, off the UI thread)."""
        if self._keys is None:
            self._build_columns()
        return self

    def _build_columns(self) -> None:
        """Gather the values of every key (see :func:`_runs_of`).

        The full columns (``None`` where a record lacks the key) are made from
        the runs when :meth:`column` asks for them.
        """
        recs = self.records
        runs = _runs_of(recs)
        if runs is None:  # keys vary from line to line: one key at a time
            keys = set().union(*recs)
            cols = self._cols
            for key in keys:
                if key not in cols:
                    cols[key] = [o.get(key) for o in recs]
            self._keys = keys
            return
        keys: set[str] = set()
        for run in runs:
            keys.update(run[2])
        self._keys = keys
        self._runs = runs

    def column(self, key: str) -> list:
        """Values of ``key`` per record (``None`` where missing); cached."""
        col = self._cols.get(key)
        if col is not None:
            return col
        if self._keys is None:
            self._build_columns()
            col = self._cols.get(key)
            if col is not None:
                return col
        runs = self._runs
        if runs is None or key not in self._keys:  # type: ignore[operator]
            col = [None] * len(self.records)
        elif len(runs) == 1:
            col = runs[0][2][key]
        else:
            col = []
            for a, b, values in runs:
                got = values.get(key)
                if got is None:
                    col += repeat(None, b - a)
                else:
                    col += got
        self._cols[key] = col
        return col

    def present(self, key: str) -> tuple[list[int], array, list]:
        """``(steps, the same as array('d'), values)`` of the records that have
        ``key`` (with a ``null`` value too).  Needs :meth:`prepare`."""
        steps = self.steps
        assert steps is not None
        if self._keys is None:
            self._build_columns()
        runs = self._runs
        sig: tuple[int, ...] | None  # None: every record
        if runs is None:  # columns built key by key
            col = self.column(key)
            sig = tuple(i for i, o in enumerate(self.records) if key in o)
            if len(sig) == len(col):
                sig, vals = None, col
            else:
                vals = [col[i] for i in sig]
        else:
            sig = tuple(i for i, run in enumerate(runs) if key in run[2])
            if len(sig) == len(runs):
                sig, vals = None, self.column(key)
            else:
                vals = []
                for i in sig:
                    vals += runs[i][2][key]
                sig = (-1, *sig)  # (run indices, not record indices)
        got = self._xs.get(sig)
        if got is None:
            if sig is None:
                xs = steps
            elif runs is None:
                xs = [steps[i] for i in sig]
            else:
                xs = []
                for i in sig[1:]:
                    xs += steps[runs[i][0] : runs[i][1]]
            got = self._xs[sig] = (xs, array("d", xs))
        return got[0], got[1], vals

    def train_finite(self, key: str) -> list[tuple[int, float]]:
        """(index, value) of finite numeric ``key`` values on train lines."""
        return list(zip(*self.train_finite_columns(key)))

    def train_finite_columns(self, key: str) -> tuple[Sequence[int], list]:
        """:meth:`train_finite` as two columns, ``(indices, values)``; cached."""
        ck = "\0train:" + key
        got = self._cols.get(ck)
        if got is not None:
            return got  # type: ignore[return-value]
        col = self.column(key)
        events = self.events
        out = None
        if events.count(TRAIN_EVENT) == len(col):
            if col.count(None) == 0:
                try:
                    if _isfinite(sum(col)):
                        out = (range(len(col)), col)
                except TypeError:
                    pass
        else:  # some eval/start lines: take the train ones, checked in C where possible
            is_train = list(map(_eq, events, repeat(TRAIN_EVENT)))
            vals = list(compress(col, is_train))
            if set(map(type, vals)) <= {float, int}:
                try:
                    if _isfinite(sum(vals)):
                        out = (list(compress(range(len(col)), is_train)), vals)
                except TypeError:
                    pass
        if out is None:
            idx = [
                i
                for i, v in enumerate(col)
                if (type(v) is float or type(v) is int) and _isfinite(v) and events[i] == TRAIN_EVENT
            ]
            out = (idx, [col[i] for i in idx])
        self._cols[ck] = out  # type: ignore[assignment]
        return out

    def nonfinite_keys(self, i: int) -> list[str]:
        return [
            k for k, v in self.records[i].items() if type(v) is float and not _isfinite(v) and k not in NON_METRIC_KEYS
        ]


def _run_bounds(items: list) -> list[int]:
    """Where each run of equal consecutive items starts, then ``len(items)``."""
    n = len(items)
    bounds = [0]
    if n > 1:
        changed = list(map(_ne, items[1:], items[:-1]))
        i = -1
        try:
            while True:
                i = changed.index(True, i + 1)
                bounds.append(i + 1)
        except ValueError:
            pass
    if n:
        bounds.append(n)
    return bounds


def _runs_of(recs: list[dict]) -> list[tuple[int, int, dict[str, list]]] | None:
    """Split ``recs`` into runs of records with the same keys; each run is
    ``(start, end, {key: its values})``.  ``None`` when there are too many runs
    for this to pay off.

    A run is first guessed from the number of keys, then each key's values are
    fetched with ``map(itemgetter(key), ...)``: C loops that allocate no object
    per record (so the GC stays asleep), and a ``KeyError`` proves that a record
    has other keys than the first one of its run.
    """
    n = len(recs)
    limit = max(64, n // 8)
    runs: list[tuple[int, int, dict[str, list]]] = []
    bounds = _run_bounds(list(map(len, recs)))
    if len(bounds) > limit:
        return None
    for a, b in zip(bounds, bounds[1:]):
        part = recs[a:b]
        try:
            runs.append((a, b, {k: list(map(itemgetter(k), part)) for k in part[0]}))
            continue
        except KeyError:  # the same number of keys, not the same keys
            pass
        shapes = [frozenset(o) for o in part]
        sub = _run_bounds(shapes)
        if len(runs) + len(sub) > limit:
            return None
        for c, d in zip(sub, sub[1:]):
            piece = part[c:d]
            runs.append((a + c, a + d, {k: list(map(itemgetter(k), piece)) for k in piece[0]}))
    return runs


_scan_once = json.JSONDecoder().scan_once  # the C scanner, minus json.loads' Python wrappers
_decode = json.JSONDecoder().decode  # strict (the default): no raw control character inside a string


def _loads(raw: bytes | str) -> object:
    """``json.loads`` for one line; raises ValueError (incl. JSONDecodeError)."""
    if type(raw) is not str:
        return json.loads(raw)
    try:
        obj, end = _scan_once(raw, 0)
    except StopIteration:  # leading whitespace or not JSON at all: let json explain
        return json.loads(raw)
    if end != len(raw) and not raw[end:].isspace():
        raise json.JSONDecodeError("Extra data", raw, end)
    return obj


#: at most this many lines are decoded by one bulk ``json`` call
BULK_LINES = 2048
_BULK_TRIES = 8  # failed bulk calls per block before the rest of it goes line by line
_SEP = ",\n"


def _bulk_ok(line: object) -> bool:
    """Can this line take part in a bulk decode (see :func:`_decode_bulk`)?"""
    return type(line) is str and line[:1] == "{" and "[" not in line and "]" not in line


def _decode_bulk(lines: list, lo: int, hi: int, out: list, todo: list[int], text: str | None = None) -> None:
    """Decode ``lines[lo:hi]`` into ``out[lo:hi]`` with as few ``json`` calls as
    possible; the indices that must be decoded on their own go to ``todo``.

    Every line must pass :func:`_bulk_ok`.  The lines are joined as
    ``[L1,\\nL2,\\n...]`` and the result is accepted only when it is a list of
    exactly ``hi - lo`` elements.  That proves each element is exactly one line,
    decoded as ``json.loads(line)`` would: a string cannot run across a separator
    (a raw newline inside a string is an error), a separator cannot sit inside an
    object (a key would have to follow it, but every line starts with ``{``) nor
    inside a nested array (no line has ``[``), so every separator splits two
    elements, and any comma of a line at the top level would add an element.
    On an error the line at the error position and the one before it are left
    to ``todo`` and both sides are retried in bulk.
    """
    stack = [(lo, hi, text)]
    tries = 0
    while stack:
        a, b, text = stack.pop()
        if b - a <= 2 or tries >= _BULK_TRIES:
            todo.extend(range(a, b))
            continue
        if text is None:
            text = "[" + _SEP.join(lines[a:b]) + "]"
        try:
            objs = _decode(text)
        except (ValueError, RecursionError) as exc:
            tries += 1
            pos = getattr(exc, "pos", None)
            if pos is None:  # no position (RecursionError): halve
                mid = (a + b) // 2
                stack += [(mid, b, None), (a, mid, None)]
                continue
            starts = list(accumulate((len(s) + 2 for s in lines[a : b - 1]), initial=1))  # line offsets
            k = min(b - 1, a + max(0, bisect_right(starts, pos) - 1))
            todo.extend(range(max(a, k - 1), k + 1))
            stack += [(k + 1, b, None), (a, max(a, k - 1), None)]
            continue
        if len(objs) != b - a:  # a line holds several values: find it by halving
            tries += 1
            mid = (a + b) // 2
            stack += [(mid, b, None), (a, mid, None)]
            continue
        out[a:b] = objs


def parse_line(raw: bytes | str, line_no: int = 0) -> dict | None:
    """Parse one line.  Blank lines give ``None``; bad lines raise :class:`CorruptLine`."""
    batch, corrupt = parse_lines([raw], line_no)
    if corrupt:
        raise corrupt[0]
    return batch.records[0] if batch.records else None


def _suspicious(raw: bytes | str) -> bool:
    return ("NaN" in raw or "Infinity" in raw) if type(raw) is str else (b"NaN" in raw or b"Infinity" in raw)


def parse_lines(
    lines: Iterable[bytes | str], first_line_no: int = 1, bulk: bool = True
) -> tuple[Batch, list[CorruptLine]]:
    """Parse consecutive lines numbered from ``first_line_no`` (blank lines are skipped).

    Lines are decoded in bulk, thousands per ``json`` call (see
    :func:`_decode_bulk`); a line that cannot take part, or that a failed bulk
    call points at, is decoded on its own.  ``bulk=False`` decodes every line on
    its own; the result is the same.
    """
    if type(lines) is not list:
        lines = list(lines)
    n = len(lines)
    out: list = [None] * n  # decoded objects (bulk); None: decode the line on its own
    todo: list[int] = []
    maybe_nan = False  # some bulk-decoded line may contain NaN/Infinity
    if not bulk:
        todo = list(range(n))
    for a in range(0, n if bulk else 0, BULK_LINES):
        b = min(n, a + BULK_LINES)
        block = lines[a:b]
        if set(map(type, block)) == {str} and all(map(str.startswith, block, repeat("{"))):
            block[0] = "[" + block[0]
            block[-1] += "]"
            text = _SEP.join(block)
            if text.find("[", 1) < 0 and text.find("]", 0, len(text) - 1) < 0:  # no line has a bracket
                _decode_bulk(lines, a, b, out, todo, text)
                # (the one-character tests are memchr-fast)
                maybe_nan = maybe_nan or ("N" in text and "NaN" in text) or ("I" in text and "Infinity" in text)
                continue
        maybe_nan = True
        i = a
        while i < b:  # mixed block: bulk-decode the runs of suitable lines
            if _bulk_ok(lines[i]):
                j = i + 1
                while j < b and _bulk_ok(lines[j]):
                    j += 1
                _decode_bulk(lines, i, j, out, todo)
                i = j
            else:
                todo.append(i)
                i += 1
    if not todo:  # every line decoded in bulk (each one an object)
        records = out
        line_nos = list(range(first_line_no, first_line_no + n))
        suspicious = [i for i, raw in enumerate(lines) if _suspicious(raw)] if maybe_nan else []
        return Batch(records, line_nos, suspicious), []
    records: list[dict] = []
    line_nos: list[int] = []
    suspicious: list[int] = []
    corrupt: list[CorruptLine] = []
    loads = _loads
    for k, raw in enumerate(lines):
        obj = out[k]
        i = first_line_no + k
        if obj is None:
            try:
                obj = loads(raw)
            except (ValueError, RecursionError) as exc:
                if not raw.strip():
                    continue
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                corrupt.append(CorruptLine(i, f"not JSON ({msg})"))
                continue
            if type(obj) is not dict:
                corrupt.append(CorruptLine(i, f"not a JSON object ({type(obj).__name__})"))
                continue
        if _suspicious(raw):
            suspicious.append(len(records))
        records.append(obj)
        line_nos.append(i)
    return Batch(records, line_nos, suspicious), corrupt


class Series:
    """Step-indexed numeric series with bounded memory (stride doubling).

    Only finite values are stored (a plot cannot draw NaN); ``last_x``/``last_y``
    and ``count`` always reflect the newest value, finite or not.
    """

    __slots__ = ("xs", "ys", "cap", "stride", "_skip", "last_x", "last_y", "count")

    def __init__(self, cap: int = 20_000) -> None:
        self.cap = max(16, cap)
        self.xs = array("d")
        self.ys = array("d")
        self.stride = 1
        self._skip = 0
        self.last_x = -math.inf
        self.last_y = math.nan
        self.count = 0

    def __len__(self) -> int:
        return len(self.xs)

    def _rewind(self, x: float) -> None:
        """The trainer restarted from an earlier step: drop the stale tail."""
        cut = bisect_left(self.xs, x)
        del self.xs[cut:]
        del self.ys[cut:]

    def _decimate(self) -> None:
        while len(self.xs) >= self.cap:
            self.xs = self.xs[::2]
            self.ys = self.ys[::2]
            self.stride *= 2
            self._skip = 0

    def append(self, x: float, y: float) -> None:
        if x < self.last_x:
            self._rewind(x)
        self.last_x = x
        self.last_y = y
        self.count += 1
        if not _isfinite(y):
            return
        self._skip += 1
        if self._skip < self.stride:
            return
        self._skip = 0
        self.xs.append(x)
        self.ys.append(y)
        if len(self.xs) >= self.cap:
            self._decimate()

    def extend(self, xs: list[int], ys: array, xs_d: array | None = None, finite: bool | None = None) -> None:
        """Append many points; ``xs`` must be non-decreasing, ``ys`` an ``array('d')``.

        ``xs_d`` is ``xs`` as an ``array('d')`` and ``finite`` tells whether every
        ``ys`` is finite, when the caller has them already.
        """
        n = len(xs)
        if not n:
            return
        if xs[0] < self.last_x:
            self._rewind(xs[0])
        self.last_x = xs[-1]
        self.last_y = ys[-1]
        self.count += n
        if finite is None:
            finite = _isfinite(sum(ys))
        if not finite:  # rare: drop NaN/Inf before storing
            keep = [i for i, y in enumerate(ys) if _isfinite(y)]
            xs = [xs[i] for i in keep]
            ys = array("d", [ys[i] for i in keep])
            xs_d = None
            n = len(xs)
            if not n:
                return
        if xs_d is None:
            xs_d = array("d", xs)
        s, k = self.stride, self._skip
        if s == 1:
            self.xs.extend(xs_d)
            self.ys.extend(ys)
        else:
            start = s - 1 - k
            if start < n:
                self.xs.extend(xs_d[start::s])
                self.ys.extend(ys[start::s])
            self._skip = (k + n) % s
        if len(self.xs) >= self.cap:
            self._decimate()

    def window(
        self, x0: float | None = None, x1: float | None = None, max_points: int = 400
    ) -> tuple[list[float], list[float]]:
        """Points with x0 <= x <= x1 (plus the newest finite one), reduced to about
        ``max_points``: each bucket keeps its min and max, so spikes stay visible."""
        xs, ys = self.xs, self.ys
        lo = 0 if x0 is None else bisect_left(xs, x0)
        hi = len(xs) if x1 is None else bisect_right(xs, x1)
        n = hi - lo
        if n > max_points and max_points >= 4:
            buckets = max_points // 2
            px: list[float] = []
            py: list[float] = []
            for b in range(buckets):
                a = lo + b * n // buckets
                e = lo + (b + 1) * n // buckets
                if e <= a:
                    continue
                chunk = ys[a:e]
                i_min = chunk.index(min(chunk))
                i_max = chunk.index(max(chunk))
                for i in sorted({i_min, i_max}):
                    px.append(xs[a + i])
                    py.append(chunk[i])
        else:
            px, py = xs[lo:hi].tolist(), ys[lo:hi].tolist()
        lx, ly = self.last_x, self.last_y
        if (
            self.count
            and _isfinite(ly)
            and (not px or px[-1] < lx)
            and (x0 is None or lx >= x0)
            and (x1 is None or lx <= x1)
        ):
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
        """Fold a batch of records (columnar: one pass per key, not per value)."""
        n = len(batch)
        if not n:
            return
        batch.prepare(self.step)
        recs, steps, events = batch.records, batch.steps, batch.events
        assert steps is not None
        self.n_records += n
        if batch.line_nos[-1] > self.n_lines:
            self.n_lines = batch.line_nos[-1]
        counts = self.events
        if events.count(TRAIN_EVENT) == n:
            counts[TRAIN_EVENT] = counts.get(TRAIN_EVENT, 0) + n
        else:
            for e, c in Counter(events).items():  # (first-seen order, like a loop)
                counts[e] = counts.get(e, 0) + c
        if batch.last_step is not None:
            self.step = batch.last_step
        keys = batch.keys()
        if "run/total_steps" in keys:
            for v in reversed(batch.column("run/total_steps")):
                if _as_int(v) is not None:
                    self.total_steps = _as_int(v)
                    break
        if "time" in keys and batch.monotonic:
            xs, xs_d, vals = batch.present("time")
            try:
                self.clock.extend(xs, array("d", vals), xs_d, _isfinite(sum(vals)))
            except TypeError:  # a null or non-numeric time somewhere: leave the axis to steps
                pass
        keys.difference_update(NON_METRIC_KEYS)
        keys.discard("event")
        meta = [k for k in keys if k.startswith("run/")]  # start-line metadata: latest value only
        for key in meta:
            keys.discard(key)
            for v in reversed(batch.column(key)):
                if v is not None:
                    (self.strings if type(v) is str else self.latest)[key] = v
                    break
        dropped: dict[tuple[int, ...], list[int]] = {}
        for key in keys:
            if batch.monotonic:  # fast paths: the values of the records that have the key
                xs, xs_d, vals = batch.present(key)
                try:
                    total = sum(vals)  # TypeError: a null, or a value that is not a number
                except TypeError:
                    if type(vals[0]) is str and set(map(type, vals)) == {str}:
                        self.strings[key] = vals[-1]  # a text key (curriculum/stage, ...)
                        continue
                else:  # numbers only: one conversion, the steps shared with the other keys
                    self._series(key).extend(xs, array("d", vals), xs_d, _isfinite(total))
                    self.latest[key] = vals[-1]
                    continue
            col = batch.column(key)
            if batch.monotonic:
                xs, vals = self._present(col, steps, dropped)
                try:
                    ys = array("d", vals)  # all numeric: fast path
                except TypeError:
                    pass
                else:
                    if vals:
                        self._series(key).extend(xs, ys)
                        self.latest[key] = vals[-1]
                    continue
            self._ingest_slow(key, col, steps)
        name = self.strings.get("run/name")
        if name:
            self.name = name
        for i in range(n - 1, -1, -1):
            if events[i] == TRAIN_EVENT:
                t = recs[i].get("time")
                if type(t) in (int, float) and _isfinite(t):
                    self.last_time = (float(t), steps[i])
                    if self.first_time is None:
                        self._set_first_time(recs, steps, events)
                break
        self.version += 1

    def _set_first_time(self, recs: list[dict], steps: list[int], events: list[str]) -> None:
        for obj, step, e in zip(recs, steps, events):
            t = obj.get("time")
            if e == TRAIN_EVENT and type(t) in (int, float) and _isfinite(t):
                self.first_time = (float(t), step)
                return

    @staticmethod
    def _present(col: list, steps: list[int], cache: dict) -> tuple[list[int], list]:
        """(steps, values) of the records that have the key (C-level work where possible)."""
        missing = col.count(None)
        if not missing:
            return steps, col
        n = len(col)
        if missing * 8 > n:  # sparse key (eval lines, ...)
            return [s for s, v in zip(steps, col) if v is not None], [v for v in col if v is not None]
        holes = []
        i = -1
        for _ in range(missing):
            i = col.index(None, i + 1)
            holes.append(i)
        sig = tuple(holes)
        xs = cache.get(sig)
        if xs is None:
            xs = list(steps)
            for i in reversed(holes):
                del xs[i]
            cache[sig] = xs
        vals = list(col)
        for i in reversed(holes):
            del vals[i]
        return xs, vals

    def _series(self, key: str) -> Series:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(self.max_points)
        return s

    def _ingest_slow(self, key: str, col: list, steps: list[int]) -> None:
        series = None
        last_num = last_str = None
        for x, v in zip(steps, col):
            t = type(v)
            if t is float or t is int:
                if series is None:
                    series = self._series(key)
                series.append(x, v)
                last_num = v
            elif t is str:
                last_str = v
        if last_num is not None:
            self.latest[key] = last_num
        if last_str is not None:
            self.strings[key] = last_str

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
        lt = self.latest
        stage = self.strings.get("curriculum/stage")
        skipped = lt.get("skipped_steps")
        return HeaderInfo(
            name=self.display_name,
            step=self.step,
            total_steps=self.total_steps,
            stage=stage,
            mixing_ratio=lt.get("curriculum/mixing_ratio"),
            kd_weight=lt.get("kd/weight"),
            tokens_per_s=lt.get("tokens_per_s"),
            eta_s=self.eta_seconds(),
            skipped_steps=int(skipped) if skipped is not None and _isfinite(skipped) else 0,
            lines=self.n_lines,
            corrupt=self.corrupt_count,
            waiting=waiting,
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
