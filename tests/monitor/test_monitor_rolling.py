"""The window helpers of the alert detectors against plain-Python references."""

import random

import numpy as np
import pytest

from npt_monitor.rolling import first_true, run_length, trailing, window_sums


@pytest.mark.parametrize("n,w", [(0, 3), (1, 3), (2, 1), (5, 3), (40, 7), (40, 100)])
def test_trailing_min_and_max_over_the_values_before_each_point(n, w):
    xs = np.array([random.Random(n * 31 + w).uniform(-5, 5) for _ in range(n)])
    lo, hi = trailing(np.minimum, xs, w, np.inf), trailing(np.maximum, xs, w, -np.inf)
    for q in range(n):
        before = xs[max(0, q - w) : q].tolist()
        assert lo[q] == (min(before) if before else np.inf)
        assert hi[q] == (max(before) if before else -np.inf)


def test_window_sums_are_exact_on_equal_windows():
    xs = np.full(50, 0.1)
    sums = window_sums(xs, 10)
    assert len(sums) == 41 and len(set(sums.tolist())) == 1  # a flat series: the same sum, no drift
    ys = np.arange(12.0)
    assert window_sums(ys, 4).tolist() == [sum(range(q, q + 4)) for q in range(9)]
    assert len(window_sums(ys, 13)) == 0


def test_run_length_counts_trues_in_a_row_with_a_carry():
    flags = np.array([True, True, False, True, False, False, True, True, True])
    assert run_length(flags).tolist() == [1, 2, 0, 1, 0, 0, 1, 2, 3]
    assert run_length(flags, carry=5).tolist() == [6, 7, 0, 1, 0, 0, 1, 2, 3]
    assert run_length(np.array([], dtype=bool), 3).tolist() == []


def test_first_true():
    mask = np.array([False, True, False, True])
    assert [first_true(mask, s) for s in range(5)] == [1, 1, 3, 3, -1]
    assert first_true(np.zeros(3, dtype=bool)) == -1
