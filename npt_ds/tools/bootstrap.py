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


def bootstrap_ratio(nll_base, nll_npt, tokens, resamples: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> RatioCI:
    """Point ratio and its percentile-bootstrap interval; seeded, so the same windows give the same interval."""
    n = len(tokens)
    if not (len(nll_base) == len(nll_npt) == n):
        raise ValueError(f"bootstrap: {len(nll_base)} base, {len(nll_npt)} NPT and {n} token counts; "
                         "give one of each per window")
    if n < 2:
        raise ValueError(f"bootstrap: needs at least 2 windows, got {n}; raise --batches")
    if resamples < 1:
        raise ValueError(f"--bootstrap: needs at least 1 resample, got {resamples}; use e.g. 2000")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must lie in (0, 1), got {confidence}")
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    reps = ppl_ratio(nll_base, nll_npt, tokens, index)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return RatioCI(ppl_ratio(nll_base, nll_npt, tokens), float(low), float(high), n, resamples, confidence)
