"""Pure alert detectors over the metric stream (shared by ``--check`` and the app).

Each detector sees every :class:`~monitor.stream.MetricRecord` in file order and
returns at most one :class:`Alert` per record.  All thresholds live in
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
    ``S_t = a*L_t + (1-a)*S_{t-1}`` (``a = osc_ema_alpha``, 0.3).  A *reversal*
    is a sign change of the smoothed loss delta that is large enough: after the
    smoothed loss has been moving up (down), it falls (rises) by at least
    ``osc_rel_amplitude`` (3 %) x ``|S_t|`` from its last extreme (a zig-zag
    filter with hysteresis; the first such move only sets the direction).  The
    alert fires when at least ``osc_min_reversals`` (4, i.e. two full up/down
    cycles) reversals happened within the last ``osc_window`` (50) loss points.
    The message reports the peak-to-peak amplitude of ``S`` over that window
    relative to its mean.  Noise smaller than the amplitude threshold, a steady
    decrease, or a single jump (e.g. a curriculum stage switch) cannot fire it.
    Re-arms when fewer than ``osc_min_reversals`` remain in the window.
``plateau`` (warning)
    Loss not decreasing over a long window: with the last ``plateau_window``
    (500) finite train losses split into an older and a newer half, fires when
    ``mean(newer) >= mean(older) - plateau_min_rel_decrease * |mean(older)|``
    (``plateau_min_rel_decrease`` defaults to 0: "not decreasing at all").
    Re-arms once the loss decreases again and at least one window has passed.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, fields
from typing import Iterable

from .stream import TRAIN_EVENT, MetricRecord

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
    osc_ema_alpha: float = 0.3
    osc_rel_amplitude: float = 0.03
    osc_window: int = 50
    osc_min_reversals: int = 4
    plateau_window: int = 500
    plateau_min_rel_decrease: float = 0.0
    loss_key: str = "loss/total"
    kl_key: str = "kd/kl"
    grad_key: str = "grad_norm"
    nonfinite_ignore: tuple[str, ...] = ("eta_s", "tokens_per_s")

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


class _Detector:
    kind = ""
    severity = WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        self.cfg = cfg

    def feed(self, rec: MetricRecord, step: int) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError


class NonFiniteDetector(_Detector):
    kind, severity = "nonfinite", ERROR

    def feed(self, rec: MetricRecord, step: int) -> str | None:
        if not rec.nonfinite:
            return None
        bad = [k for k in rec.nonfinite if k not in self.cfg.nonfinite_ignore]
        if not bad:
            return None
        shown = ", ".join(f"{k}={_fmt(rec.values[k])}" for k in bad[:4])
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        return f"non-finite {shown}{more}"


class SkippedStepDetector(_Detector):
    kind, severity = "skipped", ERROR

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.last = 0.0

    def feed(self, rec: MetricRecord, step: int) -> str | None:
        v = rec.values.get("skipped_steps")
        went_up = False
        if v is not None and _isfinite(v):
            went_up = v > self.last
            self.last = v
        if rec.event == "nan_step" or went_up:
            count = f", skipped_steps={int(self.last)}" if self.last else ""
            why = "nan_step event" if rec.event == "nan_step" else "skipped_steps increased"
            return f"step skipped ({why}{count})"
        return None


class KLDetector(_Detector):
    kind, severity = "kl_high", ERROR

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.active = False

    def feed(self, rec: MetricRecord, step: int) -> str | None:
        kl = rec.values.get(self.cfg.kl_key)
        if kl is None or not _isfinite(kl):
            return None
        if kl > self.cfg.kl_threshold:
            if not self.active:
                self.active = True
                return f"KL {_fmt(kl)} > {self.cfg.kl_threshold:g}"
        else:
            self.active = False
        return None


class GradSpikeDetector(_Detector):
    kind, severity = "grad_spike", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.recent: deque[float] = deque()
        self.ordered: list[float] = []
        self.active = False

    def feed(self, rec: MetricRecord, step: int) -> str | None:
        g = rec.values.get(self.cfg.grad_key)
        if g is None or not _isfinite(g):
            return None
        msg = None
        ordered = self.ordered
        if len(ordered) >= self.cfg.grad_spike_min_history:
            n = len(ordered)
            median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
            limit = self.cfg.grad_spike_factor * median
            if median > 0 and g > limit:
                if not self.active:
                    self.active = True
                    msg = f"grad_norm {_fmt(g)} = {g / median:.1f}x median {_fmt(median)}"
            else:
                self.active = False
        self.recent.append(g)
        insort(ordered, g)
        if len(self.recent) > self.cfg.grad_spike_window:
            old = self.recent.popleft()
            del ordered[bisect_left(ordered, old)]
        return msg


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

    def feed(self, rec: MetricRecord, step: int) -> str | None:
        if rec.event != TRAIN_EVENT:
            return None
        loss = rec.values.get(self.cfg.loss_key)
        if loss is None or not _isfinite(loss):
            return None
        cfg = self.cfg
        a = cfg.osc_ema_alpha
        s = loss if self.ema is None else a * loss + (1.0 - a) * self.ema
        self.ema = s
        self.n += 1
        self.smoothed.append(s)
        h = cfg.osc_rel_amplitude * abs(s)
        d = self.direction
        if d == 0:
            self.run_min = min(self.run_min, s)
            self.run_max = max(self.run_max, s)
            if s - self.run_min >= h and s > self.run_min:
                self.direction, self.extreme = 1, s
            elif self.run_max - s >= h and s < self.run_max:
                self.direction, self.extreme = -1, s
        elif d > 0:
            if s > self.extreme:
                self.extreme = s
            elif self.extreme - s >= h:
                self.direction, self.extreme = -1, s
                self.reversals.append(self.n)
        else:
            if s < self.extreme:
                self.extreme = s
            elif s - self.extreme >= h:
                self.direction, self.extreme = 1, s
                self.reversals.append(self.n)
        rev = self.reversals
        while rev and rev[0] <= self.n - cfg.osc_window:
            rev.popleft()
        if len(rev) >= cfg.osc_min_reversals:
            if not self.active:
                self.active = True
                sm = self.smoothed
                mean = sum(sm) / len(sm)
                amp = (max(sm) - min(sm)) / abs(mean) if mean else math.inf
                return (
                    f"loss oscillating: {len(rev)} reversals >= {cfg.osc_rel_amplitude:.0%} "
                    f"in last {cfg.osc_window} steps (amplitude {amp:.0%})"
                )
        else:
            self.active = False
        return None


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

    def feed(self, rec: MetricRecord, step: int) -> str | None:
        if rec.event != TRAIN_EVENT:
            return None
        loss = rec.values.get(self.cfg.loss_key)
        if loss is None or not _isfinite(loss):
            return None
        half = self.half
        self.newer.append(loss)
        self.sum_newer += loss
        if len(self.newer) > half:
            v = self.newer.popleft()
            self.sum_newer -= v
            self.older.append(v)
            self.sum_older += v
            if len(self.older) > half:
                self.sum_older -= self.older.popleft()
        self.since_fire += 1
        if len(self.older) < half:
            return None
        # recompute occasionally to stop float drift of the running sums
        if self.since_fire % 4096 == 0:
            self.sum_older, self.sum_newer = math.fsum(self.older), math.fsum(self.newer)
        old_mean = self.sum_older / half
        new_mean = self.sum_newer / half
        flat = new_mean >= old_mean - self.cfg.plateau_min_rel_decrease * abs(old_mean)
        if flat:
            if not self.active:
                self.active = True
                self.since_fire = 0
                return (
                    f"loss not decreasing over {2 * half} steps "
                    f"(mean {_fmt(old_mean)} -> {_fmt(new_mean)})"
                )
        elif self.since_fire >= 2 * half:
            self.active = False
        return None


class AlertEngine:
    """Runs all detectors over records in order; remembers the last step seen."""

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
        self.step = 0

    def feed(self, rec: MetricRecord) -> list[Alert]:
        if rec.step is not None:
            self.step = rec.step
        step = self.step
        out: list[Alert] = []
        for det in self.detectors:
            msg = det.feed(rec, step)
            if msg is not None:
                out.append(Alert(step, det.kind, det.severity, msg, rec.line_no))
        return out

    def feed_all(self, records: Iterable[MetricRecord]) -> list[Alert]:
        out: list[Alert] = []
        for rec in records:
            out.extend(self.feed(rec))
        return out
