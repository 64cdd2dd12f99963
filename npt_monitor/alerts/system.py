"""The machine side of a run: a straggling rank, memory that keeps growing, a throughput drop."""
from __future__ import annotations

import math

import numpy as np

from ..parsing import Batch
from ..rolling import trailing
from .base import WARNING, AlertConfig, Detector, Hits, Restarts, fmt_value, is_number, run_segments



class StragglerDetector(Detector):
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
            if not (is_number(slow[i]) and is_number(med[i]) and med[i] > 0):
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


class MemoryGrowthDetector(Detector):
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
            if ev == "train" and is_number(mem[i]):
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


class ThroughputDropDetector(Detector):
    """tokens/s below ``throughput_factor`` x its running median (lines just after an eval/save excluded)."""

    kind, severity = "throughput_drop", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.settle = 0  # rates still to ignore after an eval/checkpoint/start line
        self.restarts = Restarts(cfg.schedule_keys, rewind=False)
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
        return run_segments(self, ridx, rys, cuts, short)

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
                hits.append((int(idx[j]), f"tokens/s {fmt_value(now)} (median of the last {r}) = "
                                           f"{now / median:.0%} of its running median {fmt_value(median)}"))
        if m and qual[-1] and prev != m - 1:
            active = False
        self.active = active
        self.seen += m
        self.recent = series[-max(w, r):]
        return hits
