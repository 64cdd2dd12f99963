"""Window statistics over 1-D numpy series, for the alert detectors.

The detectors are stateful (an alert fires once per episode), but most of a
healthy stream can be ruled out by a cheap bound computed for every point at
once: a grad norm can only be 5x its trailing median if it is 5x the trailing
minimum, a rate can only be under 0.7x its trailing median if it is under 0.7x
the trailing maximum.  These helpers compute such bounds and the run lengths
the state machines need, so only the few candidate points go through Python.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["trailing", "window_sums", "run_length", "first_true"]


def trailing(ufunc: np.ufunc, xs: np.ndarray, w: int, fill: float) -> np.ndarray:
    """``out[q] = ufunc.reduce(xs[max(0, q - w) : q])``: over the (up to) ``w`` values before ``q``;
    ``fill`` where there are none (``q = 0``).  ``ufunc`` is ``np.minimum`` or ``np.maximum``."""
    n = len(xs)
    out = np.full(n, fill, dtype=float)
    if n < 2 or w < 1:
        return out
    k = min(w, n - 1)
    out[1 : k + 1] = ufunc.accumulate(xs[:k])
    if n - 1 > w:
        out[w + 1 :] = ufunc.reduce(sliding_window_view(xs, w)[1 : n - w], axis=1)
    return out


def window_sums(xs: np.ndarray, w: int) -> np.ndarray:
    """``out[q] = xs[q : q + w].sum()`` for every full window (``len(xs) - w + 1`` of them).

    Each window is summed on its own (not as a difference of running sums), so two
    windows holding the same values have exactly the same sum: a flat series reads
    a decrease of exactly 0."""
    if len(xs) < w:
        return np.empty(0)
    return sliding_window_view(xs, w).sum(axis=1)


def run_length(flags: np.ndarray, carry: int = 0) -> np.ndarray:
    """``out[j]``: how many ``flags`` are True in a row ending at ``j`` (0 where ``flags[j]`` is False);
    ``carry`` is the run already going on before ``flags[0]``."""
    j = np.arange(len(flags))
    last_false = np.maximum.accumulate(np.where(flags, -1, j)) if len(flags) else j
    return np.where(last_false < 0, carry + j + 1, j - last_false)


def first_true(mask: np.ndarray, start: int = 0) -> int:
    """The first index ``>= start`` where ``mask`` is True, or -1."""
    if start >= len(mask):
        return -1
    k = start + int(np.argmax(mask[start:]))
    return k if mask[k] else -1
