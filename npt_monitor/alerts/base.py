"""What every alert detector shares: severities, the thresholds (:class:`AlertConfig`), the :class:`Alert`
record, the detector base class, and the regime restarts (a change of schedule keys, a step going back).
What each detector means, exactly, is in ``docs/alerts.md``."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from operator import itemgetter, lt, ne, or_
from typing import Sequence

from ..parsing import Batch

ERROR = "error"
WARNING = "warning"
INFO = "info"
FAILING = (ERROR, WARNING)  # what makes ``--check`` exit 1
KINDS = ("nonfinite", "skipped", "kl_high", "stall", "grad_spike", "oscillation", "instability", "plateau",
         "straggler", "memory_growth", "throughput_drop")
_isfinite = math.isfinite


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of all detectors (their meaning: docs/alerts.md)."""

    kl_threshold: float = 8.0
    grad_spike_factor: float = 5.0
    grad_spike_window: int = 100
    grad_spike_min_history: int = 20
    grad_spike_followup: int = 5  # train losses after a spike that decide whether the loss followed it
    grad_spike_loss_tolerance: float = 0.1  # "returned to trend": their median within this of the trend
    grad_clip: float | None = None  # the run's clip norm when the stream has no run/grad_clip
    osc_window: int = 64
    osc_min_points: int = 32
    osc_power_ratio: float = 40.0
    osc_min_amplitude: float = 0.01
    osc_min_autocorr: float = 0.3
    osc_stride: int = 4  # judge every 4th loss (a window costs a 64x64 detrend and an FFT)
    osc_line_contrast: float = 8.0  # the line over the lines two bins beside it (narrow, not a 1/k² hump)
    osc_min_cycles: int = 4  # cycles of the period inside the window (two waves are no period)
    osc_persist_cycles: float = 4.0  # periods the line must hold in consecutive windows (a drift's waves wander)
    osc_long_window: int = 128  # periods longer than osc_window / osc_min_cycles (16) are judged here
    osc_long_stride: int = 16
    instab_window: int = 32
    instab_min_points: int = 16
    instab_min_swing: float = 0.13  # mean |loss - trend| / level; uniform +-a noise gives about a / 2
    instab_noise_factor: float = 2.0  # ... and this many times the run's earlier swing (once that is known)
    instab_min_blocks: int = 1  # blocks of instab_window full windows that make the earlier swing known
    # a change of these starts a new regime: the oscillation window restarts, a grad spike right at one is a note
    stage_keys: tuple[str, ...] = ("curriculum/stage", "sequential/layer")
    stall_s: float | None = None  # a fixed silence bound (s); unset: the automatic one below
    stall_min_s: float = 60.0
    stall_factor: float = 20.0  # x the median interval between train lines
    stall_startup_s: float = 600.0  # before the first train line (model load, first-step set-up)
    straggler_factor: float = 1.3
    straggler_consecutive: int = 5
    memory_growth_marks: int = 3
    memory_growth_min_rel: float = 0.02
    memory_key: str = "mem/peak_alloc_gb"
    throughput_factor: float = 0.7
    throughput_window: int = 50
    throughput_min_history: int = 10
    throughput_recent: int = 10  # the median of the last this many rates is what is compared
    throughput_settle: int = 2  # train lines after an eval/checkpoint/start line the rate ignores
    throughput_key: str = "tokens_per_s"
    plateau_window: int = 500
    plateau_min_rel_decrease: float = 0.0
    plateau_noise_z: float = 2.0  # "clearly not decreasing": the decrease this many standard errors below the margin
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


def fmt_value(v: float) -> str:
    if not _isfinite(v):
        return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    return f"{v:.4g}"


Hits = list[tuple]  # (index in batch, message[, severity, step, line_no] for a verdict on an earlier line)


class Detector:
    kind = ""
    severity = WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        self.cfg = cfg

    def scan(self, batch: Batch) -> Hits:  # pragma: no cover - abstract
        raise NotImplementedError


def is_number(v) -> bool:
    return (type(v) is float or type(v) is int) and _isfinite(v)


def run_segments(det, idx, vals, cuts: list[int], short: int) -> Hits:
    """Feed ``det._segment`` the runs of (idx, vals) between restarts (``det.restart()`` before each cut).

    A run that ends at a restart and holds at most ``short`` values can raise nothing: it is
    skipped (a ramp that restarts on every line costs one restart, not one segment, per line)."""
    hits: Hits = []
    bounds = [0, *cuts, len(idx)]
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if k:
            det.restart()
        if hi > lo and (k == 0 or k == len(cuts) or hi - lo > short):
            hits += det._segment(idx[lo:hi], vals[lo:hi])
    return hits


class Restarts:
    """Where the loss changes level by design: a change of some schedule keys, or a step going back."""

    def __init__(self, keys: tuple[str, ...], rewind: bool = True) -> None:
        self.keys = keys
        self.rewind = rewind  # whether a step going back is a restart too
        self.schedule: tuple | None = None
        self.last_step: int | None = None

    def flags(self, batch: Batch, idx: Sequence[int]) -> list[bool]:
        """Per index in `idx` (train lines, in order): whether the regime changes there."""
        if not len(idx):
            return []
        memo = ("restarts", self.keys, self.rewind, tuple(idx))  # detectors with the same keys share the work
        got = batch.memo.get(memo)
        if got is None:
            at = itemgetter(*idx) if len(idx) > 1 else lambda col: (col[idx[0]],)
            sched = list(zip(*[at(batch.column(k)) for k in self.keys])) if self.keys else [()] * len(idx)
            out = list(map(ne, sched[1:], sched))  # (schedule values are compared as read: str, float, None)
            st = at(batch.steps) if self.rewind and batch.steps is not None else None
            if st is not None:
                out = list(map(or_, out, map(lt, st[1:], st)))
            got = batch.memo[memo] = (sched[0], sched[-1], out, st[0] if st else None, st[-1] if st else None)
        first_sched, last_sched, out, first_step, last_step = got
        first = False
        if first_step is not None:
            first = self.last_step is not None and first_step < self.last_step
            self.last_step = last_step
        self.schedule, was = last_sched, self.schedule
        return [first or (was is not None and first_sched != was), *out]
