"""Pure alert detectors over the metric stream (shared by ``--check`` and the app).

Each detector scans the records of a :class:`~monitor.stream.Batch` (one JSON
object per line, in file order; one column at a time for speed) and raises at
most one :class:`Alert` per record.  All thresholds live in
:class:`AlertConfig`.  The detectors are:

``nonfinite`` (error)
    A line carries a NaN/Inf numeric value (``eta_s`` and ``tokens_per_s`` are
    ignored: an infinite ETA is not a training fault).  One alert per line.
``skipped`` (error)
    The line is an ``event: "nan_step"`` line, or the cumulative
    ``skipped_steps`` counter went up (from 0 at the start of the file).
``kl_high`` (error)
    ``kd/kl`` (raw KL before temperature scaling) > ``kl_threshold`` (default 8).
    Edge-triggered: fires when KL crosses above the threshold, re-arms once it is
    back at or below it.
``grad_spike`` (warning)
    ``grad_norm`` > ``grad_spike_factor`` (5) x the median of the last
    ``grad_spike_window`` (100) finite grad norms, once at least
    ``grad_spike_min_history`` (20) are known.  Edge-triggered like ``kl_high``.
``oscillation`` (warning)
    Uses the train-line ``loss/total`` (finite values only), smoothed with an EMA
    ``S_t = a*L_t + (1-a)*S_{t-1}`` (``a = osc_ema_alpha``, 0.2).  A *reversal*
    is a sign change of the smoothed loss delta that is large enough: after the
    smoothed loss has been moving up (down), it falls (rises) by at least
    ``osc_rel_amplitude`` (5 %) x ``|S_t|`` from its last extreme (a zig-zag
    filter with hysteresis; the first such move only sets the direction).  The
    alert fires when at least ``osc_min_reversals`` (4, i.e. two full up/down
    cycles) reversals happened within the last ``osc_window`` (50) loss points.
    The message reports the peak-to-peak amplitude of ``S`` over that window
    relative to its mean.  Noise smaller than the amplitude threshold, a steady
    decrease, or a single jump (e.g. a curriculum stage switch) cannot fire it.
    One alert per episode: it re-arms only after a whole window without the
    condition.  On synthetic runs the defaults catch a +-10 % oscillation of period 8 or
    30 steps and stay silent over 20k steps of 3 % (std) per-line noise; at 5 %
    noise they fire every few hundred steps: raise ``osc_rel_amplitude`` or
    lower ``osc_ema_alpha`` for noisier logs.
``plateau`` (warning)
    Loss not decreasing over a long window: with the last ``plateau_window``
    (500) finite train losses split into an older and a newer half, fires when
    ``mean(newer) >= mean(older) - plateau_min_rel_decrease * |mean(older)|``
    (``plateau_min_rel_decrease`` defaults to 0: "not decreasing at all").
    Re-arms once the loss decreases again and at least one window has passed.
    The window starts afresh (and the detector re-arms) whenever the loss changes
    by design: a change of any ``schedule_keys`` value (curriculum stage and
    mixing ratio, sequential layer, KD weight during its warm-up, difficulty
    keep fraction) or a step that goes back (a resume from an earlier
    checkpoint).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, fields
from typing import Iterable

from .stream import Batch

__all__ = ["Alert", "AlertConfig", "AlertEngine", "ERROR", "WARNING", "KINDS"]

ERROR = "error"
WARNING = "warning"
KINDS = ("nonfinite", "skipped", "kl_high", "grad_spike", "oscillation", "plateau")
_isfinite = math.isfinite


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of all detectors (see the module docstring for their meaning)."""

    kl_threshold: float = 8.0
    grad_spike_factor: float = 5.0
    grad_spike_window: int = 100
    grad_spike_min_history: int = 20
    osc_ema_alpha: float = 0.2
    osc_rel_amplitude: float = 0.05
    osc_window: int = 50
    osc_min_reversals: int = 4
    plateau_window: int = 500
    plateau_min_rel_decrease: float = 0.0
    loss_key: str = "loss/total"
    kl_key: str = "kd/kl"
    grad_key: str = "grad_norm"
    nonfinite_ignore: tuple[str, ...] = ("eta_s", "tokens_per_s")
    # train-line values whose change moves the loss on purpose: the plateau window restarts at each
    schedule_keys: tuple[str, ...] = ("curriculum/stage", "curriculum/mixing_ratio", "sequential/layer",
                                      "kd/weight", "difficulty/keep")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Alert:
    step: int
    kind: str
    severity: str
    message: str
    line_no: int = 0

    def format(self) -> str:
        return f"step {self.step}: {self.severity.upper()} {self.kind}: {self.message}"


def _fmt(v: float) -> str:
    if not _isfinite(v):
        return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    return f"{v:.4g}"


Hits = list[tuple[int, str]]  # (index in batch, message)


class _Detector:
    kind = ""
    severity = WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        self.cfg = cfg

    def scan(self, batch: Batch) -> Hits:  # pragma: no cover - abstract
        raise NotImplementedError


class NonFiniteDetector(_Detector):
    kind, severity = "nonfinite", ERROR

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        ignore = self.cfg.nonfinite_ignore
        for i in batch.maybe_nonfinite:
            bad = [k for k in batch.nonfinite_keys(i) if k not in ignore]
            if bad:
                rec = batch.records[i]
                shown = ", ".join(f"{k}={_fmt(rec[k])}" for k in bad[:4])
                more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
                hits.append((i, f"non-finite {shown}{more}"))
        return hits


class SkippedStepDetector(_Detector):
    kind, severity = "skipped", ERROR

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.last = 0.0

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        events = batch.events
        for i, v in enumerate(batch.column("skipped_steps")):
            went_up = False
            if (type(v) is int or type(v) is float) and _isfinite(v):
                went_up = v > self.last
                self.last = v
            if went_up or events[i] == "nan_step":
                count = f", skipped_steps={int(self.last)}" if self.last else ""
                why = "nan_step event" if events[i] == "nan_step" else "skipped_steps increased"
                hits.append((i, f"step skipped ({why}{count})"))
        return hits


class KLDetector(_Detector):
    kind, severity = "kl_high", ERROR

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        limit = self.cfg.kl_threshold
        for i, kl in enumerate(batch.column(self.cfg.kl_key)):
            if (type(kl) is not float and type(kl) is not int) or not _isfinite(kl):
                continue
            if kl > limit:
                if not self.active:
                    self.active = True
                    hits.append((i, f"KL {_fmt(kl)} > {limit:g}"))
            else:
                self.active = False
        return hits


class GradSpikeDetector(_Detector):
    kind, severity = "grad_spike", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.recent: deque[float] = deque()
        self.ordered: list[float] = []
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        cfg = self.cfg
        recent, ordered = self.recent, self.ordered
        for i, g in enumerate(batch.column(cfg.grad_key)):
            if (type(g) is not float and type(g) is not int) or not _isfinite(g):
                continue
            n = len(ordered)
            if n >= cfg.grad_spike_min_history:
                median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
                if median > 0 and g > cfg.grad_spike_factor * median:
                    if not self.active:
                        self.active = True
                        hits.append((i, f"grad_norm {_fmt(g)} = {g / median:.1f}x median {_fmt(median)}"))
                else:
                    self.active = False
            recent.append(g)
            insort(ordered, g)
            if len(recent) > cfg.grad_spike_window:
                del ordered[bisect_left(ordered, recent.popleft())]
        return hits


class OscillationDetector(_Detector):
    kind, severity = "oscillation", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.n = 0
        self.ema: float | None = None
        self.direction = 0
        self.extreme = 0.0
        self.run_min = math.inf
        self.run_max = -math.inf
        self.reversals: deque[int] = deque()
        self.smoothed: deque[float] = deque(maxlen=max(1, cfg.osc_window))
        self.active = False
        self.last_hit = 0

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        cfg = self.cfg
        a, rel, window, need = cfg.osc_ema_alpha, cfg.osc_rel_amplitude, cfg.osc_window, cfg.osc_min_reversals
        rev, smoothed = self.reversals, self.smoothed
        ema, n, d, extreme, active, last_hit = self.ema, self.n, self.direction, self.extreme, self.active, self.last_hit
        push, drop = smoothed.append, rev.popleft
        for i, loss in zip(*batch.train_finite_columns(cfg.loss_key)):
            s = loss if ema is None else a * loss + (1.0 - a) * ema
            ema = s
            n += 1
            push(s)
            h = rel * (s if s >= 0 else -s)
            if d > 0:
                if s > extreme:
                    extreme = s
                elif extreme - s >= h:
                    d, extreme = -1, s
                    rev.append(n)
            elif d < 0:
                if s < extreme:
                    extreme = s
                elif s - extreme >= h:
                    d, extreme = 1, s
                    rev.append(n)
            else:  # direction not known yet: the first large move sets it
                if s < self.run_min:
                    self.run_min = s
                if s > self.run_max:
                    self.run_max = s
                if s > self.run_min and s - self.run_min >= h:
                    d, extreme = 1, s
                elif s < self.run_max and self.run_max - s >= h:
                    d, extreme = -1, s
            while rev and rev[0] <= n - window:
                drop()
            if len(rev) >= need:
                last_hit = n
                if not active:
                    active = True
                    mean = sum(smoothed) / len(smoothed)
                    amp = (max(smoothed) - min(smoothed)) / abs(mean) if mean else math.inf
                    hits.append(
                        (
                            i,
                            f"loss oscillating: {len(rev)} reversals >= {rel:.0%} "
                            f"in last {window} steps (amplitude {amp:.0%})",
                        )
                    )
            elif active and n - last_hit >= window:
                active = False  # a whole quiet window: the episode is over
        self.ema, self.n, self.direction, self.extreme, self.active = ema, n, d, extreme, active
        self.last_hit = last_hit
        return hits


class PlateauDetector(_Detector):
    kind, severity = "plateau", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.half = max(1, cfg.plateau_window // 2)
        self.older: deque[float] = deque()
        self.newer: deque[float] = deque()
        self.sum_older = 0.0
        self.sum_newer = 0.0
        self.active = False
        self.since_fire = 0
        self.seen = 0
        self.schedule: tuple | None = None  # schedule_keys values of the last train line
        self.last_step: int | None = None

    def restart(self) -> None:
        """Forget the window: the loss level changed by design, so old and new halves are not comparable."""
        self.older.clear()
        self.newer.clear()
        self.sum_older = self.sum_newer = 0.0
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        half = self.half
        older, newer = self.older, self.newer
        min_dec = self.cfg.plateau_min_rel_decrease
        schedule_cols = [batch.column(k) for k in self.cfg.schedule_keys]
        steps = batch.steps
        for i, loss in zip(*batch.train_finite_columns(self.cfg.loss_key)):
            schedule = tuple(col[i] for col in schedule_cols)
            step = steps[i] if steps is not None else None
            rewound = step is not None and self.last_step is not None and step < self.last_step
            if rewound or (self.schedule is not None and schedule != self.schedule):
                self.restart()
            self.schedule, self.last_step = schedule, step
            newer.append(loss)
            self.sum_newer += loss
            if len(newer) > half:
                v = newer.popleft()
                self.sum_newer -= v
                older.append(v)
                self.sum_older += v
                if len(older) > half:
                    self.sum_older -= older.popleft()
            self.since_fire += 1
            self.seen += 1
            if len(older) < half:
                continue
            if self.seen % 4096 == 0:  # stop float drift of the running sums
                self.sum_older, self.sum_newer = math.fsum(older), math.fsum(newer)
            old_mean = self.sum_older / half
            new_mean = self.sum_newer / half
            if new_mean >= old_mean - min_dec * abs(old_mean):
                if not self.active:
                    self.active = True
                    self.since_fire = 0
                    hits.append(
                        (i, f"loss not decreasing over {2 * half} steps (mean {_fmt(old_mean)} -> {_fmt(new_mean)})")
                    )
            elif self.since_fire >= 2 * half:
                self.active = False
        return hits


class AlertEngine:
    """Runs all detectors over batches in file order."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        self.reset()

    def reset(self) -> None:
        cfg = self.config
        self.detectors: list[_Detector] = [
            NonFiniteDetector(cfg),
            SkippedStepDetector(cfg),
            KLDetector(cfg),
            GradSpikeDetector(cfg),
            OscillationDetector(cfg),
            PlateauDetector(cfg),
        ]
        self.step: int | None = None

    def feed(self, batch: Batch) -> list[Alert]:
        """Alerts raised by ``batch``, in line order (detector order within a line)."""
        if not len(batch):
            return []
        batch.prepare(self.step)
        if batch.last_step is not None:
            self.step = batch.last_step
        found: list[tuple[int, int, Alert]] = []
        steps, line_nos = batch.steps, batch.line_nos
        assert steps is not None
        for order, det in enumerate(self.detectors):
            for i, msg in det.scan(batch):
                found.append((i, order, Alert(steps[i], det.kind, det.severity, msg, line_nos[i])))
        found.sort(key=lambda t: (t[0], t[1]))
        return [a for _, _, a in found]

    def feed_dicts(self, records: Iterable[dict]) -> list[Alert]:
        """Convenience for tests/scripts: feed plain dicts (one per line)."""
        return self.feed(Batch.from_dicts(records))
