"""The loss curve's shape: periodic oscillation against the run's own noise, and a plateau."""
from __future__ import annotations

import functools
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


class OscillationDetector(Detector):
    kind, severity = "oscillation", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.buf: list[float] = []  # the current segment's last osc_window - 1 losses
        self.seen = 0  # losses in the current segment
        self.active = False
        self.quiet = 0
        self.restarts = Restarts(cfg.stage_keys)

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
