"""Metric-stream model: parse JSONL lines into records and fold them into a RunState.

Pure Python, no Textual.  One line of ``metrics.jsonl`` is one flat JSON object
written by the trainer (rank 0).  Any key may be missing; unknown numeric keys are
kept as series (and offered in the metric picker).  ``NaN``/``Infinity`` tokens
(Python's json writes them) parse to non-finite floats and are flagged on the
record so the alert engine can fire.

Memory stays bounded for huge files: every numeric key gets a :class:`Series`
that stores at most ``max_points`` points; when full it drops every other point
and doubles its stride (the newest value is always kept exactly).
"""

from __future__ import annotations

import json
import math
import re
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = [
    "CorruptLine",
    "HeaderInfo",
    "MetricRecord",
    "RunState",
    "Series",
    "format_eta",
    "format_rate",
    "metrics_path",
    "parse_line",
    "parse_lines",
]

#: keys that are not metrics (never plotted)
NON_METRIC_KEYS = frozenset({"step", "time", "run/total_steps"})
LAYER_KEY = re.compile(r"^layer/(\d+)/(.+)$")
LAYER_FIELDS = ("direct_mse", "v_a_norm", "v_b_norm", "v_a_attn_sim")
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


class MetricRecord:
    """One parsed line: step/event/time plus its numeric and string values."""

    __slots__ = ("line_no", "step", "event", "time", "values", "strings", "nonfinite")

    def __init__(
        self,
        line_no: int,
        step: int | None,
        event: str,
        time: float | None,
        values: dict[str, float],
        strings: dict[str, str],
        nonfinite: tuple[str, ...] = (),
    ) -> None:
        self.line_no = line_no
        self.step = step
        self.event = event
        self.time = time
        self.values = values
        self.strings = strings
        self.nonfinite = nonfinite

    @classmethod
    def from_obj(cls, obj: dict, line_no: int = 0) -> "MetricRecord":
        values: dict[str, float] = {}
        strings: dict[str, str] = {}
        nonfinite: list[str] = []
        for key, v in obj.items():
            tv = type(v)
            if tv is float or tv is int:
                if key in NON_METRIC_KEYS:
                    continue
                values[key] = v
                if tv is float and not _isfinite(v):
                    nonfinite.append(key)
            elif tv is str:
                strings[key] = v
        step = _as_int(obj.get("step"))
        t = obj.get("time")
        t = float(t) if type(t) in (int, float) and _isfinite(t) else None
        event = obj.get("event")
        if type(event) is not str or not event:
            event = TRAIN_EVENT
        total = _as_int(obj.get("run/total_steps"))
        if total is not None:
            values["run/total_steps"] = total
        return cls(line_no, step, event, t, values, strings, tuple(nonfinite))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"MetricRecord(line={self.line_no}, step={self.step}, event={self.event!r}, n={len(self.values)})"


def _as_int(v: object) -> int | None:
    if type(v) is int:
        return v
    if type(v) is float and _isfinite(v) and v == int(v):
        return int(v)
    return None


def parse_line(raw: bytes | str, line_no: int = 0) -> MetricRecord | None:
    """Parse one line.  Blank lines give ``None``; bad lines raise :class:`CorruptLine`."""
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise CorruptLine(line_no, f"not JSON ({msg})") from None
    if type(obj) is not dict:
        raise CorruptLine(line_no, f"not a JSON object ({type(obj).__name__})")
    return MetricRecord.from_obj(obj, line_no)


def parse_lines(
    lines: Iterable[bytes | str], first_line_no: int = 1
) -> tuple[list[MetricRecord], list[CorruptLine]]:
    """Parse consecutive lines numbered from ``first_line_no``."""
    records: list[MetricRecord] = []
    corrupt: list[CorruptLine] = []
    for i, raw in enumerate(lines, first_line_no):
        try:
            rec = parse_line(raw, i)
        except CorruptLine as exc:
            corrupt.append(exc)
            continue
        if rec is not None:
            records.append(rec)
    return records, corrupt


class Series:
    """Step-indexed numeric series with bounded memory (stride doubling)."""

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

    def append(self, x: float, y: float) -> None:
        if x < self.last_x:  # trainer restarted from an earlier step: drop the stale tail
            cut = bisect_left(self.xs, x)
            del self.xs[cut:]
            del self.ys[cut:]
        self.last_x = x
        self.last_y = y
        self.count += 1
        self._skip += 1
        if self._skip < self.stride:
            return
        self._skip = 0
        self.xs.append(x)
        self.ys.append(y)
        if len(self.xs) >= self.cap:
            self.xs = self.xs[::2]
            self.ys = self.ys[::2]
            self.stride *= 2

    def window(
        self, x0: float | None = None, x1: float | None = None, max_points: int = 400
    ) -> tuple[list[float], list[float]]:
        """Finite points with x0 <= x <= x1, reduced to about ``max_points``.

        Reduction keeps the min and max of each bucket so spikes stay visible.
        """
        xs, ys = self.xs, self.ys
        lo = 0 if x0 is None else bisect_left(xs, x0)
        hi = len(xs) if x1 is None else bisect_right(xs, x1)
        px = list(xs[lo:hi])
        py = list(ys[lo:hi])
        lx, ly = self.last_x, self.last_y
        if self.count and (not px or px[-1] != lx) and (x0 is None or lx >= x0) and (x1 is None or lx <= x1):
            px.append(lx)
            py.append(ly)
        pts = [(x, y) for x, y in zip(px, py) if _isfinite(y)]
        n = len(pts)
        if n > max_points and max_points >= 4:
            buckets = max_points // 2
            out: list[tuple[float, float]] = []
            for b in range(buckets):
                chunk = pts[b * n // buckets : (b + 1) * n // buckets]
                if not chunk:
                    continue
                lo_pt = min(chunk, key=lambda p: p[1])
                hi_pt = max(chunk, key=lambda p: p[1])
                out.extend(sorted({lo_pt, hi_pt}))
            pts = out
        return [p[0] for p in pts], [p[1] for p in pts]


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
    def ingest(self, rec: MetricRecord) -> None:
        self.n_records += 1
        if rec.line_no > self.n_lines:
            self.n_lines = rec.line_no
        event = rec.event
        self.events[event] = self.events.get(event, 0) + 1
        step = rec.step
        if step is not None:
            self.step = step
        else:  # a line without a step belongs to the last step seen
            step = self.step if self.step is not None else 0
        strings = rec.strings
        if strings:
            self.strings.update(strings)
            name = strings.get("run/name")
            if name:
                self.name = name
        values = rec.values
        total = values.get("run/total_steps")
        if total is not None:
            self.total_steps = int(total)
        latest = self.latest
        series = self.series
        cap = self.max_points
        for key, v in values.items():
            latest[key] = v
            s = series.get(key)
            if s is None:
                s = series[key] = Series(cap)
            s.append(step, v)
        if rec.time is not None and event == TRAIN_EVENT:
            if self.first_time is None:
                self.first_time = (rec.time, step)
            self.last_time = (rec.time, step)
        self.version += 1

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
        return sorted(k for k in self.series if k != "run/total_steps")

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
            cache[key] = (int(m.group(1)), m.group(2)) if m else None
        return cache[key]

    def layers(self) -> dict[int, dict[str, float]]:
        """Latest per-layer values: {layer index: {field: value}}."""
        out: dict[int, dict[str, float]] = {}
        for key, v in self.latest.items():
            lf = self._layer_of(key)
            if lf is not None:
                out.setdefault(lf[0], {})[lf[1]] = v
        return dict(sorted(out.items()))
