"""Run state: every record of one run folded into bounded per-key series, the header and the layer table.

Memory stays bounded for huge files: every numeric key gets a :class:`Series` that stores at most
``max_points`` points; when full it drops every other point and doubles its stride (the newest value is
always kept exactly).  Any key may be missing; unknown numeric keys are kept as series (and offered in the
metric picker).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .parsing import NON_METRIC_KEYS, Batch, CorruptLine, as_int, last_of

LAYER_KEY = re.compile(r"^(eval/)?layer/(\d+)/(.+)$")  # train values, and held-out ones as field "eval/<name>"
LAYER_FIELDS = ("direct_mse", "v_a_norm", "v_b_norm", "v_a_attn_sim", "eval/direct_mse_teacher_in",
                "eval/direct_mse_student_in")

_isfinite = math.isfinite
END_EVENTS = frozenset({"end", "stop", "abort", "preempted"})  # the run ended: silence is no stall
RUN_EVENTS = frozenset({"start", "train"})  # the run is (again) under way
GAPS_KEPT = 256


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
        self.last_line_time: float | None = None  # the `time` of the newest line that has one (any event)
        self.train_gaps = np.empty(0)  # seconds between the last (up to 256) consecutive timed train lines
        self.train_seen = False
        self.last_event: str | None = None  # the newest line's event
        self.last_phase: str | None = None  # its `phase` (or its `rank_phases`), where the stream carries one
        self.ended = False  # the newest start/train/end-like line is an end event (end, stop, abort, preempted)
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
        self._fold_progress(batch)
        keys = batch.keys()
        if "run/total_steps" in keys:
            total = last_of(batch.column("run/total_steps"), lambda v: as_int(v) is not None)
            if total is not None:
                self.total_steps = as_int(total)
        if "time" in keys:
            self._fold_time(batch)
        for key in keys - NON_METRIC_KEYS - {"event"}:
            if key.startswith("run/"):  # start-line metadata: latest value only
                v = last_of(batch.column(key))
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

    def _fold_progress(self, batch: Batch) -> None:
        """What the stall judgement needs: the newest line's event and phase, whether the run ended."""
        events = batch.events
        self.train_seen = self.train_seen or bool(batch.is_train.any())
        self.last_event = events[-1]
        last = batch.records[-1]
        phase, phases = last.get("phase"), last.get("rank_phases")
        if type(phase) is str and phase:
            self.last_phase = phase
        elif type(phases) is dict and phases:
            self.last_phase = ", ".join(f"rank {r} {p}" for r, p in phases.items())
        else:
            self.last_phase = None
        for e in reversed(events):
            if e in END_EVENTS or e in RUN_EVENTS:
                self.ended = e in END_EVENTS
                break

    def _fold_time(self, batch: Batch) -> None:
        """The wall-time axis (``clock``), the first/last timed train lines (ETA), the newest line's time and
        the gaps between train lines (the stall bound)."""
        idx, ts, _, _ = batch.numeric("time")
        self.clock.extend(batch.x if idx is None else batch.x[idx], ts)
        t = np.full(len(batch), math.nan)
        t[slice(None) if idx is None else idx] = ts
        finite = np.isfinite(ts)
        if finite.any():
            self.last_line_time = float(ts[finite][-1])
        timed = (np.isfinite(t) & batch.is_train).nonzero()[0]
        if len(timed):
            times = t[timed[-(GAPS_KEPT + 1):]]
            if self.last_time is not None:
                times = np.concatenate([[self.last_time[0]], times])
            self.train_gaps = np.concatenate([self.train_gaps, np.diff(times)])[-GAPS_KEPT:]
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

    def median_train_gap(self) -> float | None:
        """The median of the (last 256) intervals between consecutive train lines' ``time``, in seconds."""
        gaps = self.train_gaps[np.isfinite(self.train_gaps) & (self.train_gaps >= 0)]
        return float(np.median(gaps)) if len(gaps) else None

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
