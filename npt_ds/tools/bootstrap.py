"""NPT/base perplexity ratio with a percentile-bootstrap confidence interval over held-out windows.

ratio = ppl_npt / ppl_base = exp((Σ nll_npt − Σ nll_base) / Σ tokens) over a set of windows.  A bootstrap
replicate draws as many windows as there are, with replacement (numpy ``default_rng(seed)``), and recomputes
the ratio; the interval is the (α/2, 1 − α/2) percentiles of the replicates.  Windows, not tokens, are the
resampled unit: tokens inside one window are correlated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RatioCI:
    ratio: float  # point estimate on all windows
    low: float
    high: float
    windows: int
    resamples: int
    confidence: float


def ppl_ratio(nll_base, nll_npt, tokens, index=None) -> np.ndarray | float:
    """exp((Σ nll_npt − Σ nll_base) / Σ tokens) over windows; `index` (R, n) picks R resampled sets at once."""
    base, npt, tok = (np.asarray(a, dtype=np.float64) for a in (nll_base, nll_npt, tokens))
    if index is None:
        return float(np.exp((npt.sum() - base.sum()) / tok.sum()))
    index = np.asarray(index)
    return np.exp((npt[index].sum(axis=-1) - base[index].sum(axis=-1)) / tok[index].sum(axis=-1))


def _resample(n: int, resamples: int, seed: int, confidence: float) -> np.ndarray:
    """(resamples, n) window indices drawn with replacement, after checking the arguments."""
    if n < 2:
        raise ValueError(f"bootstrap: needs at least 2 windows, got {n}; raise --batches")
    if resamples < 1:
        raise ValueError(f"--bootstrap: needs at least 1 resample, got {resamples}; use e.g. 2000")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must lie in (0, 1), got {confidence}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(point: float, reps: np.ndarray, n: int, resamples: int, confidence: float) -> RatioCI:
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return RatioCI(point, float(low), float(high), n, resamples, confidence)


def bootstrap_ratio(nll_base, nll_npt, tokens, resamples: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> RatioCI:
    """Point ratio and its percentile-bootstrap interval; seeded, so the same windows give the same interval."""
    n = len(tokens)
    if not (len(nll_base) == len(nll_npt) == n):
        raise ValueError(f"bootstrap: {len(nll_base)} base, {len(nll_npt)} NPT and {n} token counts; "
                         "give one of each per window")
    index = _resample(n, resamples, seed, confidence)
    return _interval(ppl_ratio(nll_base, nll_npt, tokens), ppl_ratio(nll_base, nll_npt, tokens, index), n,
                     resamples, confidence)


def bootstrap_difference(windows: dict, other: dict, resamples: int = 2000, seed: int = 0,
                         confidence: float = 0.95) -> RatioCI:
    """ratio(windows) − ratio(other) on the same windows, paired: each replicate resamples one set of window
    indices for both, so the windows' own difficulty cancels.  Each argument holds ``nll_base``, ``nll_npt``
    and ``tokens`` per window (what ``npt-ds eval --out`` writes under "windows")."""
    if list(windows["tokens"]) != list(other["tokens"]):
        raise ValueError(f"bootstrap: the two evaluations scored other windows ({len(windows['tokens'])} vs "
                         f"{len(other['tokens'])}, or other token counts); evaluate both with the same --data, "
                         "--batches and --seq-len")
    n = len(windows["tokens"])
    index = _resample(n, resamples, seed, confidence)

    def ratio(w, idx=None):
        return ppl_ratio(w["nll_base"], w["nll_npt"], w["tokens"], idx)

    return _interval(ratio(windows) - ratio(other), ratio(windows, index) - ratio(other, index), n, resamples,
                     confidence)
