"""The machine side of a run: a straggling rank, memory that keeps growing, a throughput drop."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np

from ..parsing import Batch
from ..rolling import first_true, run_length, trailing
from .base import WARNING, AlertConfig, Detector, Hits, Restarts, fmt_value, is_number, run_segments

RANK_STEP = re.compile(r"rank/(\d+)/step_s$")


class StragglerDetector(Detector):
    """The slowest rank's own step time > straggler_factor x the median rank's, for K log lines in a row,
    from whatever the stream has (``time/step_max_s`` / ``time/step_median_s`` / ``time/step_min_s`` /
    ``time/slowest_rank``, or the ranks' ``rank/{r}/step_s``)."""

    kind, severity = "straggler", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.run = 0
        self.rank: float | None = None  # the slowest rank of the run going on (NaN: not named)
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        rows, slow, ref, who, by_min = self._judged(batch)
        m = len(rows)
        if not m:
            return []
        cfg = self.cfg
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = slow / ref
        over = ratio > cfg.straggler_factor
        carried = self.run > 0 and bool(over[0])  # the slow stretch of the last batch goes on
        before = np.concatenate([[self.rank if carried else np.nan], who[:-1]])
        cont = over & np.concatenate([[carried], over[:-1]]) & _same(who, before)  # the same rank slow again
        counted = run_length(cont)
        lead = np.arange(m) < (first_true(~cont) if (~cont).any() else m)  # the run carried in from the last batch
        length = np.where(over, np.where(cont, np.where(lead, self.run + counted, counted + 1), 1), 0)
        episode = np.cumsum(~over)  # the rows of one stretch of slow lines share an id (0: the carried one)
        hits: Hits = []
        fired: set[int] = {0} if carried and self.active else set()
        for j in np.nonzero(over & (length >= cfg.straggler_consecutive))[0].tolist():
            e = int(episode[j])
            if e in fired:
                continue
            fired.add(e)
            rank = "a rank (not named)" if math.isnan(who[j]) else f"rank {int(who[j])}"
            base = "the fastest rank's" if by_min[j] else "the median rank's"
            hits.append((int(rows[j]), f"{rank} is a straggler: its step {slow[j]:.3g} s = {ratio[j]:.2f}x {base} "
                                       f"{ref[j]:.3g} s for {int(length[j])} log steps"))
        if over[-1]:
            self.run, self.rank, self.active = int(length[-1]), float(who[-1]), int(episode[-1]) in fired
        else:
            self.run, self.rank, self.active = 0, None, False
        return hits

    def _judged(self, batch: Batch) -> tuple[np.ndarray, ...]:
        """(rows, slowest s, reference s, slowest rank or NaN, whether the reference is the fastest rank) of
        the lines that have both a slowest and a reference step time."""
        n = len(batch)
        col = {}
        for key in ("time/step_max_s", "time/step_median_s", "time/step_min_s", "time/slowest_rank"):
            col[key] = _dense(batch, key, n) if key in batch.keys() else None
        ranks = sorted((int(m.group(1)), k) for k in batch.keys() if (m := RANK_STEP.match(k)))
        slow, med, fast, who = (col[k] for k in ("time/step_max_s", "time/step_median_s", "time/step_min_s",
                                                  "time/slowest_rank"))
        if ranks:
            own = np.stack([_dense(batch, k, n) for _, k in ranks], axis=1)
            have = np.isfinite(own)
            count = have.sum(axis=1)
            filled = np.where(have, own, -np.inf)
            top = filled.argmax(axis=1)
            r_max = np.where(count > 0, filled.max(axis=1), np.nan)
            r_who = np.where(count > 0, np.array([r for r, _ in ranks], dtype=float)[top], np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # rows without any rank: NaN, as meant
                r_med = np.where(count >= 2, np.nanmedian(own, axis=1), np.nan)
            slow = r_max if slow is None else np.where(np.isfinite(slow), slow, r_max)
            who = r_who if who is None else np.where(np.isfinite(who), who, r_who)
            med = r_med if med is None else np.where(np.isfinite(med), med, r_med)
        nan = np.full(n, np.nan)
        slow, med, fast, who = (nan if c is None else c for c in (slow, med, fast, who))
        by_min = ~np.isfinite(med)
        ref = np.where(by_min, fast, med)
        rows = np.nonzero(np.isfinite(slow) & np.isfinite(ref) & (ref > 0))[0]
        return rows, slow[rows], ref[rows], who[rows], by_min[rows]


def _dense(batch: Batch, key: str, n: int) -> np.ndarray:
    """``key``'s numbers per line (NaN where the line has none)."""
    idx, ys, _, _ = batch.numeric(key)
    if idx is None:
        return ys.astype(float, copy=True)
    out = np.full(n, np.nan)
    out[idx] = ys
    return out


def _same(a, b) -> np.ndarray:
    """Whether two slowest-rank values name the same rank (two unnamed ones count as the same)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return (a == b) | (np.isnan(a) & np.isnan(b))


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
