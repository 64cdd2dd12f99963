"""The loss curve's shape: periodic oscillation and instability against the run's own noise, and a plateau."""
from __future__ import annotations

import functools
from bisect import bisect_right
from itertools import compress
from typing import Sequence

import numpy as np

from ..parsing import Batch
from ..rolling import first_true, run_length, window_sums
from .base import WARNING, AlertConfig, Detector, Hits, Restarts, fmt_value, run_segments



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


def periodicity(windows: np.ndarray, contrast: float = 8.0, k_range: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``windows`` (m, n): (peak power / median power, relative amplitude, period, autocorr).

    The row is detrended by a quadratic fit; its periodogram's strongest line among the bins ``k_range``
    (default: 4 .. n/4, i.e. at least four cycles in the window and a period of 4 steps or more) is compared
    with the median of all lines (the run's own noise floor); amplitude = that line's sine amplitude / |mean
    level|; autocorr = the residual's autocorrelation at the line's period (a line from a step or drift has
    none).  A line that is not ``contrast`` x the lines two bins beside it is broad (a step's or a drift's 1/k²
    spectrum, not a swing's narrow line): its ratio is 0.
    """
    m, n = windows.shape
    res = _detrend(windows)
    power = np.abs(np.fft.rfft(res, axis=1)) ** 2 / n
    lo, hi = k_range if k_range is not None else (4, n // 4)
    hi = max(lo, min(hi, power.shape[1] - 1))
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


class LossWindows(Detector):
    """Shared by the detectors that judge windows of the train loss: the losses of the current regime
    (the window restarts at a change of ``stage_keys`` and where the step goes back), kept between batches."""

    keep = 1  # losses of the segment kept for the next batch (a subclass's longest window - 1)

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.buf = np.empty(0)  # the current segment's last `keep` losses
        self.seen = 0  # losses in the current segment
        self.total = 0  # losses seen, all segments together
        self.restarts = Restarts(cfg.stage_keys)

    def restart(self) -> None:
        self.buf, self.seen = np.empty(0), 0

    def scan(self, batch: Batch) -> Hits:
        idx, vals = batch.train_finite_columns(self.cfg.loss_key)
        cuts = list(compress(range(len(idx)), self.restarts.flags(batch, idx)))
        hits: Hits = []
        bounds = [0, *cuts, len(idx)]
        for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            if k:
                self.restart()  # a new window starts here (an episode in progress goes on)
            if hi > lo:
                series = np.concatenate([self.buf, np.asarray(vals[lo:hi], dtype=float)])
                counts = self.seen + 1 + np.arange(hi - lo)  # each loss's place in its segment, from 1
                hits += self._judge(idx[lo:hi], series, len(self.buf), counts, self.total + 1 + np.arange(hi - lo))
                self.seen += hi - lo
                self.total += hi - lo
                self.buf = series[-self.keep:] if self.keep > 0 else np.empty(0)
        return hits

    def _judge(self, idx: Sequence[int], series: np.ndarray, first: int, counts: np.ndarray,
               totals: np.ndarray) -> Hits:  # pragma: no cover - abstract
        """``series[first + j]`` is the loss of ``idx[j]``; ``counts[j]`` its place in the segment,
        ``totals[j]`` in the run."""
        raise NotImplementedError


class OscillationDetector(LossWindows):
    """A narrow spectral line held over ``osc_min_cycles`` cycles in the window and for ``osc_persist_cycles``
    more periods: periods 4 .. osc_window / cycles in the short window, up to osc_long_window / cycles in the
    long one."""

    kind, severity = "oscillation", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.keep = max(cfg.osc_window, cfg.osc_long_window) - 1
        self.held = [0, 0]  # per window length: judged windows in a row with a line
        self.active = False
        self.last_line = 0  # `total` at the last judged window with a line

    def restart(self) -> None:
        super().restart()
        self.held = [0, 0]

    def _levels(self) -> list[tuple[int, int, int, int]]:
        """(window, stride, lowest bin, highest bin) of the short and the long window."""
        cfg = self.cfg
        cycles, w, wl = max(1, cfg.osc_min_cycles), cfg.osc_window, cfg.osc_long_window
        long_hi = -(-wl * cycles // w) - 1  # periods longer than the short window's longest (w / cycles)
        return [(w, max(1, cfg.osc_stride), cycles, w // 4), (wl, max(1, cfg.osc_long_stride), cycles, long_hi)]

    def _judge(self, idx, series, first, counts, totals) -> Hits:
        cfg = self.cfg
        m = len(counts)
        need = max(8, cfg.osc_min_points)
        line = np.zeros(m, dtype=bool)  # a line in some window (the episode goes on)
        fire = np.zeros(m, dtype=bool)  # a line held for osc_persist_cycles periods (the alert)
        shown: dict[int, tuple[float, float, float, int]] = {}  # j -> (period, amp, ratio, window)
        for level, (w, stride, k_lo, k_hi) in enumerate(self._levels()):
            if w < 8 or k_hi < k_lo:
                continue
            at = counts % stride == 0
            ratio, amp, period = np.zeros(m), np.zeros(m), np.zeros(m)
            ac = np.zeros(m)
            full = np.nonzero((counts >= w) & at)[0]
            if len(full):  # every full window at once
                wins = np.lib.stride_tricks.sliding_window_view(series, w)[first + full - w + 1]
                ratio[full], amp[full], period[full], ac[full] = periodicity(wins, cfg.osc_line_contrast, (k_lo, k_hi))
            if level == 0:  # the segment's first, shorter windows (the long window waits until it is full)
                short = np.nonzero((counts >= need) & (counts < w) & at)[0]
                for j in short:
                    n = int(counts[j])
                    win = series[first + j - n + 1 : first + j + 1][None, :]
                    r, a, p, c = periodicity(win, cfg.osc_line_contrast, (k_lo, n // 4))
                    ratio[j], amp[j], period[j], ac[j] = r[0], a[0], p[0], c[0]
                at &= counts >= need
            else:
                at &= counts >= w
            ok = (ratio >= cfg.osc_power_ratio) & (amp >= cfg.osc_min_amplitude) & (ac >= cfg.osc_min_autocorr)
            js = np.nonzero(at)[0]
            held = run_length(ok[js], self.held[level])  # judged windows in a row with a line
            if len(js):
                self.held[level] = int(held[-1])
            persist = held * stride >= max(0, cfg.osc_persist_cycles) * period[js]
            line[js] |= ok[js]
            for j in js[ok[js] & persist].tolist():
                fire[j] = True
                shown.setdefault(j, (period[j], amp[j], ratio[j], min(int(counts[j]), w)))
        hits: Hits = []
        w = cfg.osc_window
        for j in np.nonzero(line)[0].tolist():  # (a fire is a line)
            if self.active and totals[j] - self.last_line > w:
                self.active = False  # a whole window without a line before this one: the episode was over
            self.last_line = int(totals[j])
            if fire[j] and not self.active:
                self.active = True
                p, a, r, n = shown[j]
                hits.append((idx[j], f"loss oscillating: period ~{p:.0f} steps, amplitude {a:.0%} of the loss, "
                                     f"{r:.0f}x the run's noise floor, held for {cfg.osc_persist_cycles:g} periods "
                                     f"(last {n} steps)"))
        if self.active and totals[-1] - self.last_line >= w:
            self.active = False
        return hits


class InstabilityDetector(LossWindows):
    """The loss swings far around its own trend, against its level and the run's earlier noise, at any
    period or none."""

    kind, severity = "instability", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.keep = max(1, cfg.instab_window) - 1
        self.active = False
        self.last_loud = 0  # `total` at the last window whose scatter reached instab_min_swing / 2
        self.block: list[float] = []  # the scatter of the full windows of the block being filled
        self.block_medians: list[float] = []
        self.block_ends: list[int] = []  # `total` at each block's last window
        self._baseline: tuple[int, float | None] = (0, None)  # (blocks it is the median of, the median)

    def baseline(self, first_total: int) -> float | None:
        """The run's earlier noise for a window starting at loss ``first_total``: the median of the medians of
        the blocks of ``instab_window`` full windows' scatter (3/4 of the mean step-to-step change over the level)
        that ended before it."""
        n = bisect_right(self.block_ends, first_total - 1)
        if n < max(1, self.cfg.instab_min_blocks):
            return None
        if self._baseline[0] != n:
            self._baseline = (n, float(np.median(self.block_medians[:n])))
        return self._baseline[1]

    def _judge(self, idx, series, first, counts, totals) -> Hits:
        """The step-to-step scatter of every window first (cumulative sums: no loop, no fit); only the windows
        whose scatter reaches instab_min_swing get the trend fit."""
        cfg = self.cfg
        w, need, m = max(3, cfg.instab_window), max(3, cfg.instab_min_points), len(counts)
        end = first + np.arange(m)  # the window of loss j ends at series[end[j]]
        sums = np.concatenate([[0.0], np.cumsum(series)])
        steps = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(series)))])

        def scatter_of(size: np.ndarray) -> np.ndarray:
            start = end - size + 1
            level = (sums[end + 1] - sums[start]) / size
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(level > 0, 0.75 * (steps[end] - steps[start]) / np.maximum(size - 1, 1) / level, 0.0)

        size = np.minimum(counts, w)
        scatter = scatter_of(size)
        full = counts >= w
        if full.any():
            self._remember(scatter[full], totals[full])
        # once the run's earlier noise is known, the last instab_min_points losses are judged too: a swing that
        # starts mid-run fills them sooner than the whole window
        recent = np.where(full & (scatter_of(np.minimum(counts, need)) >= cfg.instab_min_swing), need, 0)
        thr = cfg.instab_min_swing
        # the episode goes on while the scatter stays above half the bound (hysteresis: noise right at the bound
        # would otherwise end and start episodes over and over); it is over after a whole window below that
        loud = np.nonzero(scatter >= thr / 2)[0]
        gaps = np.diff(np.concatenate([[self.last_loud], totals[loud]])) if len(loud) else np.empty(0)
        quiet_before = set(loud[gaps > w].tolist())
        judged = (counts >= need) & (scatter >= thr)
        hits: Hits = []
        for j in sorted(quiet_before | set(np.nonzero(judged | (recent > 0))[0].tolist())):
            if j in quiet_before:
                self.active = False
            if self.active:
                continue
            for n, known_only in ((int(size[j]), False), (int(recent[j]), True)):
                if not n or (n == size[j] and not judged[j]):
                    continue
                win = series[end[j] - n + 1 : end[j] + 1]
                swing = float(swings(win[None, :])[0])
                base = self.baseline(int(totals[j] - n + 1))
                if swing < thr or (known_only and base is None):
                    continue
                if base is None or swing >= cfg.instab_noise_factor * base:
                    self.active = True
                    hits.append((idx[j], instability_message(win, swing, base)))
                    break
        if len(loud):
            self.last_loud = int(totals[loud[-1]])
        if self.active and totals[-1] - self.last_loud >= w:
            self.active = False
        return hits

    def _remember(self, swing: np.ndarray, totals: np.ndarray) -> None:
        """Add full windows' scatter to the blocks of ``instab_window`` (the earlier-noise history)."""
        w = max(1, self.cfg.instab_window)
        have = len(self.block)
        pool = np.concatenate([np.asarray(self.block), swing])
        n_blocks = len(pool) // w
        if n_blocks:
            self.block_medians += np.median(pool[: n_blocks * w].reshape(n_blocks, w), axis=1).tolist()
            self.block_ends += totals[np.arange(1, n_blocks + 1) * w - 1 - have].tolist()
        self.block = pool[n_blocks * w :].tolist()


def swings(windows: np.ndarray) -> np.ndarray:
    """Per row: how far the losses swing around their trend, as a fraction of the row's mean level (0 where
    that level is not positive): the smaller of the mean distance from the row's quadratic trend and 3/4 of the
    mean step-to-step change (for independent noise both estimate the same distance: uniform noise exactly,
    Gaussian within 6 %; a level step moves one change only, a slow wave every change a little, so neither
    reads as a swing there)."""
    off_trend = np.abs(_detrend(windows)).mean(axis=1)
    changes = 0.75 * np.abs(np.diff(windows, axis=1)).mean(axis=1)
    level = windows.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(level > 0, np.minimum(off_trend, changes) / level, 0.0)


def swing_period(win: np.ndarray, min_corr: float = 0.75) -> int | None:
    """The period of a swing, from the step-to-step changes' autocorrelation: the lag (2 .. 8) where it is
    highest, if that is at least ``min_corr`` (a flip-flop that fills the window reaches ~0.9 at its period;
    measured on +-40 % uniform noise, 1 alert in 400 was labelled periodic)."""
    d = np.diff(win)
    d = d - d.mean()
    var = float((d * d).sum())
    best = max(((float((d[:-p] * d[p:]).sum()) / var, p) for p in range(2, min(8, len(d) // 3) + 1)),
               default=(0.0, 0)) if var > 0 else (0.0, 0)
    return best[1] if best[0] >= min_corr else None


def instability_message(win: np.ndarray, swing: float, base: float | None) -> str:
    """What the alert says: the swing, against the earlier noise, and whether it has a period."""
    period = swing_period(win)
    shape = f"period ~{period} steps" if period else "no fixed period"
    against = (f"{swing / base:.1f}x the run's earlier {base:.1%}" if base else "from the start: no earlier noise "
               "to compare")
    return (f"loss swinging around its trend: mean |loss - trend| = {swing:.0%} of the loss over the last "
            f"{len(win)} steps ({against}; {shape})")


class PlateauDetector(Detector):
    kind, severity = "plateau", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.half = max(1, cfg.plateau_window // 2)
        self.pushes = 0  # losses seen, all windows together
        self.fired_at = 0  # `pushes` at the last alert
        self.restarts = Restarts(cfg.schedule_keys)
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
        return run_segments(self, idx, vals, cuts, 2 * self.half - 1)

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
                                               f"{fmt_value(old_mean[k])} -> {fmt_value(new_mean[k])}, noise se {fmt_value(se[k])})"))
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
