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
``grad_spike`` (warning, or info)
    ``grad_norm`` > ``grad_spike_factor`` (5) x the median of the last
    ``grad_spike_window`` (100) finite grad norms, once at least
    ``grad_spike_min_history`` (20) are known.  Edge-triggered like ``kl_high``.
    Judged after ``grad_spike_followup`` (5) more train losses: the message says
    whether the step was clipped (``grad_norm`` > the start line's ``run/grad_clip``,
    or ``grad_clip``) and whether the loss followed (the median of those losses
    above the median of the 20 before the spike by more than
    ``grad_spike_loss_tolerance``, 10 %).  Clipped and back on trend: ``info``
    (a note, not a failure of ``--check``); so is a clipped spike within
    ``grad_spike_followup`` lines before or after a ``stage_keys`` change (the loss moves by
    design there).  At the end of a file an undecided spike
    is a warning (:meth:`AlertEngine.finish`).
``oscillation`` (warning)
    Periodicity against the run's own noise, not a fixed fraction of the level.
    Over the last ``osc_window`` (64) finite train losses (from ``osc_min_points``,
    32, on), detrended by a least-squares quadratic: the periodogram's strongest
    line with at least two cycles in the window (period 4 .. window/2) must be
    ``osc_power_ratio`` (40) x the median line (the noise floor: batch noise is
    spread over all lines, a swing sits in one), its sine amplitude at least
    ``osc_min_amplitude`` (1 %) of the mean loss, and the residual's
    autocorrelation at that period at least ``osc_min_autocorr`` (0.3): a step or a
    drift leaves a low-frequency line but no repeating shape; and the line must
    be narrow: ``osc_line_contrast`` (8) x the lines two bins beside it.  One alert per
    episode; re-arms after a whole window without the condition.  Judged at
    every ``osc_stride``-th (4) loss of the window's segment.  The window
    restarts at a change of ``stage_keys`` (curriculum stage, sequential
    layer) and when the step goes back.  Measured: the real ``make demo`` stream
    peaks at 15x, 5000 steps of 3 % noise at ~21x, +-10 % swings of period 8 or 30
    on 2 % noise reach 100-600x within ~20 steps.
``plateau`` (warning)
    Loss not decreasing over a long window, judged against the run's own noise:
    with the last ``plateau_window`` (500) finite train losses split into an
    older and a newer half, the decrease is ``D = mean(older) - mean(newer)`` and
    the margin ``m = plateau_min_rel_decrease * |mean(older)|`` (default 0: "not
    decreasing at all").  The noise level is the scatter of step-to-step
    differences, ``sigma^2 = mean(diff^2) / 2`` over the window (batch noise is
    independent from step to step, a trend barely moves a difference), which
    gives the standard error of ``D``: ``se = sigma * sqrt(2 / half)``.  Fires when
    the loss is clearly not decreasing, ``D <= m - plateau_noise_z * se`` (z = 2),
    or when ``D <= m`` has held on ``plateau_window / 2`` consecutive losses (a
    noisy flat run hovers around ``D = 0``; a healthy run whose decrease is only
    noise-sized crosses below it for a few steps, not for half a window).  Without
    noise (se = 0) both read ``D <= m`` at once.
    Re-arms once the loss decreases again and at least one window has passed.
    The window starts afresh (and the detector re-arms) whenever the loss changes
    by design: a change of any ``schedule_keys`` value (curriculum stage and
    mixing ratio, sequential layer, KD weight during its warm-up, difficulty
    keep fraction) or a step that goes back (a resume from an earlier
    checkpoint).
``straggler`` (warning)
    ``time/step_max_s`` (the slowest rank's own step time, without its waits for
    the others) > ``straggler_factor`` (1.3) x ``time/step_median_s`` on
    ``straggler_consecutive`` (5) log lines in a row, the same
    ``time/slowest_rank`` on each; names the rank.  Re-arms when the ratio drops.
``memory_growth`` (warning)
    ``memory_key`` (``mem/peak_alloc_gb``, the last train line's value when an
    eval or checkpoint line comes) rose by more than ``memory_growth_min_rel`` (2 %)
    at each of ``memory_growth_marks`` (3) such marks in a row.
``throughput_drop`` (warning)
    The median of the last ``throughput_recent`` (10) ``tokens_per_s`` values <
    ``throughput_factor`` (0.7) x the median of its last ``throughput_window`` (50) values (after ``throughput_min_history``, 10).  The
    ``throughput_settle`` (2) train lines after an eval/checkpoint/start line are
    skipped: their window holds the eval or the save.  The median restarts where a
    ``schedule_keys`` value changes (a step's cost changes by design).
"""

from __future__ import annotations

import functools
import math
import statistics
from itertools import compress
from operator import itemgetter, lt, ne, or_
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import numpy as np

from .rolling import first_true, run_length, trailing, window_sums
from .stream import Batch

__all__ = ["Alert", "AlertConfig", "AlertEngine", "ERROR", "WARNING", "INFO", "KINDS", "FAILING"]

ERROR = "error"
WARNING = "warning"
INFO = "info"
FAILING = (ERROR, WARNING)  # what makes ``--check`` exit 1
KINDS = ("nonfinite", "skipped", "kl_high", "grad_spike", "oscillation", "plateau", "straggler", "memory_growth",
         "throughput_drop")
_isfinite = math.isfinite


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of all detectors (see the module docstring for their meaning)."""

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
    # a change of these starts a new regime: the oscillation window restarts, a grad spike right at one is a note
    stage_keys: tuple[str, ...] = ("curriculum/stage", "sequential/layer")
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


def _fmt(v: float) -> str:
    if not _isfinite(v):
        return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    return f"{v:.4g}"


Hits = list[tuple]  # (index in batch, message[, severity, step, line_no] for a verdict on an earlier line)


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


def _num(v) -> bool:
    return (type(v) is float or type(v) is int) and _isfinite(v)


class GradSpikeDetector(_Detector):
    """A spike is judged once ``grad_spike_followup`` train losses followed it (or at :meth:`finish`)."""

    kind, severity = "grad_spike", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.recent = np.empty(0)  # the last grad_spike_window finite grad norms
        self.n_grads = 0  # finite grad norms seen
        self.active = False
        self.clip = cfg.grad_clip
        self.losses: deque[float] = deque(maxlen=20)  # the loss trend before a spike: their median
        self.pending: list = []  # [step, line_no, text, clipped, trend, losses after, at a stage change, batch index]
        self.stages = _Restarts(cfg.stage_keys)
        self.since_stage = 10**9  # train lines since the last stage change

    def _judge(self, spike: list, complete: bool) -> tuple[str, str, int, int]:
        step, line_no, text, clipped, trend, after, staged, _ = spike
        clip = "clipped" if clipped else ("not clipped" if clipped is not None else "clip norm unknown")
        if staged and clipped:  # the loss moves by design there: nothing to compare with
            return INFO, f"{text}; {clip}; at a curriculum/sequential stage change", step, line_no
        if not after or trend is None:
            return WARNING, f"{text}; {clip}; loss follow-up unknown", step, line_no
        later = statistics.median(after)
        returned = later <= trend * (1 + self.cfg.grad_spike_loss_tolerance) if trend >= 0 else later <= trend
        follow = (f"loss back on trend ({_fmt(later)} vs {_fmt(trend)})" if returned
                  else f"loss followed it ({_fmt(later)} vs trend {_fmt(trend)})")
        if not complete:
            follow += f" after {len(after)} steps"
        return (INFO if clipped and returned else WARNING), f"{text}; {clip}; {follow}", step, line_no

    def scan(self, batch: Batch) -> Hits:
        """Every finite grad norm is first bounded by its trailing minimum (a spike over the median is
        one over the minimum too); only those candidates get the exact median and the state machine."""
        cfg = self.cfg
        train = batch.is_train.nonzero()[0]
        changed = np.zeros(len(batch), dtype=bool)
        changed[train] = self.stages.flags(batch, train.tolist())
        since = run_length(~changed[train], self.since_stage)  # train lines since a stage change, per train line
        loss_idx, loss_vals = batch.train_finite_columns(cfg.loss_key)
        gidx, gys, _, _ = batch.numeric(cfg.grad_key)
        gidx = np.arange(len(batch)) if gidx is None else gidx
        ok = np.isfinite(gys)
        gidx, gys = gidx[ok], gys[ok]
        cidx, cys, _, _ = batch.numeric("run/grad_clip")
        if len(cys):
            finite = np.isfinite(cys)
            cidx, cys = (np.arange(len(batch)) if cidx is None else cidx)[finite], cys[finite]
        w, first = cfg.grad_spike_window, len(self.recent)
        hist = np.concatenate([self.recent, gys])
        n_hist = np.minimum(self.n_grads + np.arange(len(gys)), w)  # grad norms known before each
        qual = n_hist >= cfg.grad_spike_min_history
        bound = trailing(np.minimum, hist, w, np.inf)[first:]
        cand = (qual & (gys > cfg.grad_spike_factor * bound)).nonzero()[0]
        active, prev = self.active, -1
        for j in cand.tolist():
            if j > 0 and qual[j - 1] and prev != j - 1:
                active = False  # a qualifying norm in between was no candidate, so no spike
            prev = j
            q = first + j
            median = float(np.median(hist[q - n_hist[j] : q]))
            g = float(gys[j])
            if not (median > 0 and g > cfg.grad_spike_factor * median):
                active = False
                continue
            if active:
                continue
            active = True
            i = int(gidx[j])
            c = int(np.searchsorted(cidx, i, "right")) if len(cys) else 0
            clip = float(cys[c - 1]) if c else self.clip
            prior = list(self.losses) + loss_vals[: bisect_left(loss_idx, i)]
            t = int(np.searchsorted(train, i, "right"))
            since_i = int(since[t - 1]) if t else self.since_stage
            self.pending.append([batch.steps[i], batch.line_nos[i],
                                 f"grad_norm {_fmt(g)} = {g / median:.1f}x median {_fmt(median)}",
                                 None if clip is None or clip <= 0 else g > clip,
                                 statistics.median(prior[-20:]) if prior else None, [],
                                 since_i < cfg.grad_spike_followup, i])
        if len(gys) and qual[-1] and prev != len(gys) - 1:
            active = False
        self.active = active
        hits = self._follow_up(batch, loss_idx, loss_vals, changed)
        if len(cys):
            self.clip = float(cys[-1])
        self.losses.extend(loss_vals)
        self.recent = hist[-w:] if w > 0 else np.empty(0)
        self.n_grads += len(gys)
        if len(train):
            self.since_stage = int(since[-1])
        return hits

    def _follow_up(self, batch: Batch, loss_idx: list, loss_vals: list, changed: np.ndarray) -> Hits:
        """Give each waiting spike the train losses after its line; judge those that have enough."""
        hits: Hits = []
        stage_lines = changed.nonzero()[0]
        waiting = []
        for spike in self.pending:
            origin = spike[7]
            start = bisect_right(loss_idx, origin)
            take = max(1, self.cfg.grad_spike_followup - len(spike[5]))
            spike[5] += loss_vals[start : start + take]
            done = len(spike[5]) >= self.cfg.grad_spike_followup and start + take <= len(loss_idx)
            end = loss_idx[start + take - 1] if done else len(batch)
            if len(stage_lines) and ((stage_lines > origin) & (stage_lines <= end)).any():
                spike[6] = True  # a stage started while the spike waited: the loss moves by design
            if done:
                sev, msg, step, line_no = self._judge(spike, True)
                hits.append((end, msg, sev, step, line_no))
            else:
                spike[7] = -1  # in the next batch every loss is after it
                waiting.append(spike)
        self.pending = waiting
        return hits

    def finish(self) -> list[tuple[str, str, int, int]]:
        """The spikes still waiting for their follow-up (end of a file)."""
        out = [self._judge(spike, False) for spike in self.pending]
        self.pending = []
        return out


class StragglerDetector(_Detector):
    """The slowest rank's own step time > straggler_factor x the median rank's, for K log lines in a row."""

    kind, severity = "straggler", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.run = 0
        self.rank = None
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        cfg = self.cfg
        slow, med, who = (batch.column(k) for k in ("time/step_max_s", "time/step_median_s", "time/slowest_rank"))
        for i in range(len(batch)):
            if not (_num(slow[i]) and _num(med[i]) and med[i] > 0):
                continue
            ratio = slow[i] / med[i]
            if ratio > cfg.straggler_factor:
                self.run = self.run + 1 if who[i] == self.rank else 1
                self.rank = who[i]
                if self.run >= cfg.straggler_consecutive and not self.active:
                    self.active = True
                    hits.append((i, f"rank {who[i]} is a straggler: its step {slow[i]:.3g} s = {ratio:.2f}x the "
                                    f"median rank's {med[i]:.3g} s for {self.run} log steps"))
            else:
                self.run, self.rank, self.active = 0, None, False
        return hits


class MemoryGrowthDetector(_Detector):
    """Peak memory (as of each eval/checkpoint line) rising at ``memory_growth_marks`` marks in a row."""

    kind, severity = "memory_growth", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.latest = None  # the last train line's memory
        self.marks: list[tuple[int, float]] = []  # (step, memory) at evals/checkpoints
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        cfg = self.cfg
        mem, events, steps = batch.column(cfg.memory_key), batch.events, batch.steps
        for i, ev in enumerate(events):
            if ev == "train" and _num(mem[i]):
                self.latest = float(mem[i])
            elif ev in ("eval", "checkpoint") and self.latest is not None:
                if self.marks and self.marks[-1][0] == steps[i]:
                    continue  # eval and checkpoint of the same step: one mark
                self.marks.append((steps[i], self.latest))
                need = cfg.memory_growth_marks
                last = self.marks[-(need + 1):]
                rising = len(last) == need + 1 and all(b[1] > a[1] * (1 + cfg.memory_growth_min_rel)
                                                       for a, b in zip(last, last[1:]))
                if rising and not self.active:
                    self.active = True
                    trail = " -> ".join(f"{m:.3g}" for _, m in last)
                    hits.append((i, f"peak memory rising at {need} evals/checkpoints in a row: {trail} GB "
                                    f"(steps {last[0][0]}..{last[-1][0]})"))
                elif not rising:
                    self.active = False
        return hits


class ThroughputDropDetector(_Detector):
    """tokens/s below ``throughput_factor`` x its running median (lines just after an eval/save excluded)."""

    kind, severity = "throughput_drop", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.settle = 0  # rates still to ignore after an eval/checkpoint/start line
        self.restarts = _Restarts(cfg.schedule_keys, rewind=False)
        self.restart()

    def restart(self) -> None:
        """A new curriculum stage / mixing ratio / sequential layer costs another amount per step by design."""
        self.recent = np.empty(0)  # the last max(throughput_window, throughput_recent) rates
        self.seen = 0  # rates since the median restarted
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        cfg = self.cfg
        train = batch.is_train.nonzero()[0]
        restart_at = train[np.asarray(self.restarts.flags(batch, train.tolist()), dtype=bool)].tolist()
        ridx, rys, _, _ = batch.numeric(cfg.throughput_key)
        ridx = np.arange(len(batch)) if ridx is None else ridx
        keep = np.isfinite(rys) & batch.is_train[ridx]
        ridx, rys = ridx[keep], rys[keep]
        # the first `throughput_settle` rates after an eval/checkpoint/start line hold its time: ignored
        triggers = np.array([i for i, e in enumerate(batch.events) if e in ("eval", "checkpoint", "start")],
                            dtype=np.int64)
        rank = np.arange(1, len(ridx) + 1)  # 1-based, among the batch's rates
        t = np.searchsorted(triggers, ridx, "right")  # the triggers before each rate
        rates_before = np.searchsorted(ridx, triggers, "right")  # the rates before each trigger
        since = np.where(t > 0, rank - rates_before[np.maximum(t - 1, 0)], rank) if len(triggers) else rank
        settled = since > np.where(t > 0, cfg.throughput_settle, self.settle)
        last_run = len(ridx) - int(rates_before[-1]) if len(triggers) else len(ridx)
        self.settle = max(0, (cfg.throughput_settle if len(triggers) else self.settle) - last_run)
        ridx, rys = ridx[settled], rys[settled]
        cuts = np.searchsorted(ridx, restart_at, "left").tolist()  # the median restarts before those rates
        short = max(cfg.throughput_min_history, max(1, cfg.throughput_recent) - 1)  # no longer: nothing to judge
        return _segments(self, ridx, rys, cuts, short)

    def _segment(self, idx: np.ndarray, vals: np.ndarray) -> Hits:
        """Rates bounded by their trailing maximum first (under 0.7x the median is under 0.7x the maximum)."""
        cfg = self.cfg
        w, r, factor = cfg.throughput_window, max(1, cfg.throughput_recent), cfg.throughput_factor
        series = np.concatenate([self.recent, vals])
        first, m = len(self.recent), len(vals)
        hits: Hits = []
        if self.seen + m <= max(cfg.throughput_min_history, r - 1):  # nothing to judge yet (a ramp restarts often)
            self.seen += m
            self.recent = series[-max(w, r):]
            return hits
        before = self.seen + np.arange(m)  # rates of this median before each
        n_hist = np.minimum(before, w)
        qual = (n_hist >= cfg.throughput_min_history) & (before + 1 >= r)
        cand = (qual & (vals < factor * trailing(np.maximum, series, w, -np.inf)[first:])).nonzero()[0]
        active, prev = self.active, -1
        for j in cand.tolist():
            if j > 0 and qual[j - 1] and prev != j - 1:
                active = False  # a qualifying rate in between was no candidate, so not slow
            prev, q = j, first + j
            median = float(np.median(series[q - n_hist[j] : q]))
            limit = factor * median
            now = float(np.median(series[q - r + 1 : q + 1])) if vals[j] < limit else math.inf
            if now >= limit:
                active = False
            elif not active:
                active = True
                hits.append((int(idx[j]), f"tokens/s {_fmt(now)} (median of the last {r}) = "
                                           f"{now / median:.0%} of its running median {_fmt(median)}"))
        if m and qual[-1] and prev != m - 1:
            active = False
        self.active = active
        self.seen += m
        self.recent = series[-max(w, r):]
        return hits


@functools.lru_cache(maxsize=64)
def _quadratic_basis(n: int) -> np.ndarray:
    """An orthonormal basis (n, 3) of the quadratics over n points."""
    t = np.linspace(-1.0, 1.0, n)
    q, _ = np.linalg.qr(np.stack([np.ones(n), t, t * t], axis=1))
    return q


def _detrend(windows: np.ndarray) -> np.ndarray:
    """Each row minus its least-squares quadratic, by einsum's own loops (not optimised into a BLAS call: a
    threaded BLAS would spin cores of the machine the monitor shares with the run it watches)."""
    q = _quadratic_basis(windows.shape[1])
    return windows - np.einsum("mk,nk->mn", np.einsum("mn,nk->mk", windows, q), q)


def periodicity(windows: np.ndarray, contrast: float = 8.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``windows`` (m, n): (peak power / median power, relative amplitude, period, autocorr).

    The row is detrended by a quadratic fit; its periodogram's strongest line with at least two
    cycles in the window (period 4 .. n/2) is compared with the median of all lines (the run's own
    noise floor); amplitude = that line's sine amplitude / |mean level|; autocorr = the residual's
    autocorrelation at the line's period (a line from a step or drift has none).  A line that is not
    ``contrast`` x the lines two bins beside it is broad (a step's or a drift's 1/k² spectrum, not a
    swing's narrow line): its ratio is 0.
    """
    m, n = windows.shape
    res = _detrend(windows)
    power = np.abs(np.fft.rfft(res, axis=1)) ** 2 / n
    lo, hi = 2, max(2, n // 4)
    k = lo + np.argmax(power[:, lo : hi + 1], axis=1)
    peak = power[np.arange(m), k]
    floor = np.median(power[:, 1:], axis=1)
    rows = np.arange(m)
    beside = np.maximum(np.where(k - 2 >= 1, power[rows, np.maximum(k - 2, 1)], 0.0),
                        np.where(k + 2 < power.shape[1], power[rows, np.minimum(k + 2, power.shape[1] - 1)], 0.0))
    peak = np.where(peak >= contrast * beside, peak, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(floor > 0, peak / floor, np.where(peak > 0, np.inf, 0.0))
        level = np.abs(windows.mean(axis=1))
        amp = np.where(level > 0, 2.0 * np.sqrt(peak / n) / level, 0.0)
    period = n / k
    lag = np.rint(period).astype(int)
    var = (res * res).mean(axis=1)
    ac = np.zeros(m)
    for p in np.unique(lag):  # few distinct lags
        rows = lag == p
        r = res[rows]
        cov = (r[:, : n - p] * r[:, p:]).mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ac[rows] = np.where(var[rows] > 0, cov / var[rows], 0.0)
    return ratio, amp, period, ac


def _segments(det, idx, vals, cuts: list[int], short: int) -> Hits:
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


class _Restarts:
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
        at = itemgetter(*idx) if len(idx) > 1 else lambda col: (col[idx[0]],)
        sched = list(zip(*[at(batch.column(k)) for k in self.keys])) if self.keys else [()] * len(idx)
        out = list(map(ne, sched[1:], sched))  # (schedule values are compared as read: str, float, None)
        if self.rewind and batch.steps is not None:
            st = at(batch.steps)
            out = list(map(or_, out, map(lt, st[1:], st)))
            first = self.last_step is not None and st[0] < self.last_step
            self.last_step = st[-1]
        else:
            first = False
        out.insert(0, first or (self.schedule is not None and sched[0] != self.schedule))
        self.schedule = sched[-1]
        return out


class OscillationDetector(_Detector):
    kind, severity = "oscillation", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.buf: list[float] = []  # the current segment's last osc_window - 1 losses
        self.seen = 0  # losses in the current segment
        self.active = False
        self.quiet = 0
        self.restarts = _Restarts(cfg.stage_keys)

    def scan(self, batch: Batch) -> Hits:
        cfg = self.cfg
        idx, vals = batch.train_finite_columns(cfg.loss_key)
        if not len(idx):
            return []
        restart = self.restarts.flags(batch, idx)
        hits: Hits = []
        cuts = [j for j, r in enumerate(restart) if r] + [len(idx)]
        lo = 0
        for cut in cuts:
            if cut > lo:
                hits += self._segment(idx[lo:cut], vals[lo:cut])
            if cut < len(idx):  # a new window starts at `cut` (an episode in progress goes on)
                self.buf, self.seen = [], 0
            lo = cut
        return hits

    def _segment(self, idx: Sequence[int], vals: list) -> Hits:
        cfg = self.cfg
        w, need = cfg.osc_window, max(8, cfg.osc_min_points)
        series = np.asarray(self.buf + list(vals), dtype=float)
        first = len(self.buf)  # series[first + j] is vals[j]
        ratio = np.zeros(len(vals))
        amp = np.zeros(len(vals))
        period = np.zeros(len(vals))
        ac = np.zeros(len(vals))
        counts = self.seen + 1 + np.arange(len(vals))
        judged = counts % max(1, cfg.osc_stride) == 0  # every osc_stride-th loss of the segment (cost)
        full = np.nonzero((counts >= w) & judged)[0]
        if len(full):  # every full window at once
            wins = np.lib.stride_tricks.sliding_window_view(series, w)[first + full - w + 1]
            ratio[full], amp[full], period[full], ac[full] = periodicity(wins, cfg.osc_line_contrast)
        for j in np.nonzero((counts >= need) & (counts < w) & judged)[0]:  # the segment's first, shorter windows
            win = series[first + j - counts[j] + 1 : first + j + 1][None, :]
            r, a, p, c = periodicity(win, cfg.osc_line_contrast)
            ratio[j], amp[j], period[j], ac[j] = r[0], a[0], p[0], c[0]
        fire = (ratio >= cfg.osc_power_ratio) & (amp >= cfg.osc_min_amplitude) & (ac >= cfg.osc_min_autocorr)
        hits: Hits = []
        active, quiet = self.active, self.quiet
        for j in np.nonzero(judged)[0]:
            if fire[j]:
                quiet = 0
                if not active:
                    active = True
                    hits.append((idx[j], f"loss oscillating: period ~{period[j]:.0f} steps, amplitude "
                                         f"{amp[j]:.0%} of the loss, {ratio[j]:.0f}x the run's noise floor "
                                         f"(last {min(int(counts[j]), w)} steps)"))
            elif active:
                quiet += max(1, cfg.osc_stride)
                if quiet >= w:
                    active = False  # a whole quiet window: the episode is over
        self.active, self.quiet = active, quiet
        self.seen += len(vals)
        self.buf = list(series[-(w - 1):]) if w > 1 else []
        return hits


class PlateauDetector(_Detector):
    kind, severity = "plateau", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.half = max(1, cfg.plateau_window // 2)
        self.pushes = 0  # losses seen, all windows together
        self.fired_at = 0  # `pushes` at the last alert
        self.restarts = _Restarts(cfg.schedule_keys)
        self.restart()

    def restart(self) -> None:
        """Forget the window: the loss level changed by design, so old and new halves are not comparable."""
        self.window = np.empty(0)  # the last 2 * half - 1 losses of the window
        self.seen = 0  # losses since the window started
        self.flat_run = 0  # consecutive full windows with D <= m
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        idx, vals = batch.train_finite_columns(self.cfg.loss_key)
        cuts = list(compress(range(len(idx)), self.restarts.flags(batch, idx)))
        return _segments(self, idx, vals, cuts, 2 * self.half - 1)

    def _segment(self, idx: Sequence[int], vals: list) -> Hits:
        """Every full window of the segment at once: D, m and se per loss, then the few state changes."""
        cfg, half = self.cfg, self.half
        series = np.concatenate([self.window, np.asarray(vals, dtype=float)])
        first, m = len(self.window), len(vals)
        hits: Hits = []
        if self.seen + m >= 2 * half:  # some windows are full (a ramp restarts on every line: none are)
            full = (self.seen + 1 + np.arange(m) >= 2 * half).nonzero()[0]
            p = first + full  # each full window is series[p - 2 half + 1 : p + 1]
            q0 = int(p[0]) - 2 * half + 1
            sums = window_sums(series[q0:], half)
            old_mean = sums[p - 2 * half + 1 - q0] / half
            new_mean = sums[p - half + 1 - q0] / half
            d2 = np.concatenate([[0.0], np.cumsum(np.diff(series[q0:]) ** 2)])
            sq = np.maximum(0.0, d2[p - q0] - d2[p - 2 * half + 1 - q0])  # the window's 2 half - 1 differences
            se = np.sqrt(sq / (2 * half - 1) / half)  # sigma^2 = mean(diff^2) / 2, se = sigma sqrt(2 / half)
            decrease = old_mean - new_mean
            margin = cfg.plateau_min_rel_decrease * np.abs(old_mean)
            falling = decrease > margin
            flat_run = run_length(~falling, self.flat_run)
            fire = ~falling & ((decrease <= margin - cfg.plateau_noise_z * se) | (flat_run >= half))
            pushes = self.pushes + 1 + full  # `pushes` after each full window's loss
            k = 0
            while True:
                if not self.active:
                    k = first_true(fire, k)
                    if k < 0:
                        break
                    self.active, self.fired_at = True, int(pushes[k])
                    hits.append((idx[full[k]], f"loss not decreasing over {2 * half} steps (mean "
                                               f"{_fmt(old_mean[k])} -> {_fmt(new_mean[k])}, noise se {_fmt(se[k])})"))
                else:  # re-arms once the loss falls again, a window after the alert
                    k = first_true(falling & (pushes - self.fired_at >= 2 * half), k)
                    if k < 0:
                        break
                    self.active = False
                k += 1
            self.flat_run = int(flat_run[-1])
        self.seen += m
        self.pushes += m
        self.window = series[-(2 * half - 1):]
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
            StragglerDetector(cfg),
            MemoryGrowthDetector(cfg),
            ThroughputDropDetector(cfg),
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
            for i, msg, *late in det.scan(batch):  # late: (severity, step, line_no) of a delayed verdict
                sev, step, line_no = late if late else (det.severity, steps[i], line_nos[i])
                found.append((i, order, Alert(step, det.kind, sev, msg, line_no)))
        found.sort(key=lambda t: (t[0], t[1]))
        return [a for _, _, a in found]

    def finish(self) -> list[Alert]:
        """Verdicts still waiting for later lines, at the end of a complete file (``--check``)."""
        out = []
        for det in self.detectors:
            finish = getattr(det, "finish", None)
            for sev, msg, step, line_no in (finish() if finish else []):
                out.append(Alert(step, det.kind, sev, msg, line_no))
        return out

    def feed_dicts(self, records: Iterable[dict]) -> list[Alert]:
        """Convenience for tests/scripts: feed plain dicts (one per line)."""
        return self.feed(Batch.from_dicts(records))
