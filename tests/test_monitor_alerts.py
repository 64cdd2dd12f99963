"""npt-monitor: pure alert detectors, with exact expectations."""

from __future__ import annotations

import math

import pytest

from monitor.alerts import AlertConfig, AlertEngine
from monitor.stream import Batch, parse_lines
from monitor.synth import synth_lines, synth_records


def alerts_for(records, **cfg):
    return AlertEngine(AlertConfig(**cfg)).feed(Batch.from_dicts(records))


def losses(values, start_step=1):
    return [{"step": start_step + i, "loss/total": v} for i, v in enumerate(values)]


def summary(alerts):
    return [(a.step, a.kind) for a in alerts]


# -- KL ---------------------------------------------------------------------------------
def test_kl_above_threshold_is_edge_triggered():
    recs = [{"step": s, "kd/kl": kl} for s, kl in enumerate([7.9, 9.4, 9.5, 7.0, 8.5, 8.0], start=1)]
    alerts = alerts_for(recs)
    assert summary(alerts) == [(2, "kl_high"), (5, "kl_high")]
    assert alerts[0].message == "KL 9.4 > 8" and alerts[0].severity == "error"
    assert alerts[0].format() == "step 2: ERROR kl_high: KL 9.4 > 8"


def test_kl_threshold_is_configurable():
    recs = [{"step": 1, "kd/kl": 9.4}]
    assert alerts_for(recs, kl_threshold=10.0) == []
    assert summary(alerts_for(recs, kl_threshold=9.0)) == [(1, "kl_high")]


# -- non-finite / skipped -----------------------------------------------------------------
def test_nan_line_raises_nonfinite():
    alerts = alerts_for([{"step": 6, "loss/total": 2.0}, {"step": 7, "loss/total": math.nan, "grad_norm": math.inf}])
    assert summary(alerts) == [(7, "nonfinite")]
    assert alerts[0].message == "non-finite loss/total=NaN, grad_norm=Inf"


def test_nan_step_event_raises_nonfinite_and_skipped():
    lines = ['{"step": 9, "loss/total": 1.0, "skipped_steps": 0}', '{"step": 10, "event": "nan_step", "skipped_steps": 1, "loss/total": NaN}']
    batch, _ = parse_lines(lines)
    alerts = AlertEngine().feed(batch)
    assert summary(alerts) == [(10, "nonfinite"), (10, "skipped")]
    assert alerts[1].message == "step skipped (nan_step event, skipped_steps=1)"
    assert alerts[1].line_no == 2


def test_skipped_counter_increase_without_event():
    recs = [{"step": s, "skipped_steps": k} for s, k in [(1, 0), (2, 0), (3, 2), (4, 2), (5, 3)]]
    assert summary(alerts_for(recs)) == [(3, "skipped"), (5, "skipped")]


def test_infinite_eta_is_not_an_alert():
    assert alerts_for([{"step": 1, "eta_s": math.inf, "tokens_per_s": math.nan, "loss/total": 3.0}]) == []


# -- grad spikes --------------------------------------------------------------------------
def test_grad_spike_against_rolling_median():
    norms = [1.0] * 30 + [6.0, 7.0, 1.0, 6.0, 4.0]
    recs = [{"step": i + 1, "grad_norm": g} for i, g in enumerate(norms)]
    alerts = alerts_for(recs)
    assert summary(alerts) == [(31, "grad_spike"), (34, "grad_spike")]
    assert alerts[0].message == "grad_norm 6 = 6.0x median 1"


def test_grad_spike_needs_history():
    recs = [{"step": i + 1, "grad_norm": g} for i, g in enumerate([1.0] * 5 + [50.0])]
    assert alerts_for(recs) == []


# -- oscillation --------------------------------------------------------------------------
def test_oscillation_counts_large_reversals_exactly():
    # no smoothing: 10 -> 12 sets direction "up"; 10.5 is a 12.5% drop (>= 10%): reversal 1;
    # 12 is a 14% rise: reversal 2 -> fires at step 4; step 5 (reversal 3) is the same episode.
    cfg = dict(osc_ema_alpha=1.0, osc_rel_amplitude=0.10, osc_window=10, osc_min_reversals=2)
    alerts = alerts_for(losses([10, 12, 10.5, 12, 10.5]), **cfg)
    assert summary(alerts) == [(4, "oscillation")]
    assert alerts[0].message.startswith("loss oscillating: 2 reversals >= 10% in last 10 steps")


def test_oscillation_ignores_swings_below_amplitude():
    cfg = dict(osc_ema_alpha=1.0, osc_rel_amplitude=0.10, osc_window=10, osc_min_reversals=2)
    assert alerts_for(losses([10, 10.5, 10, 10.5, 10, 10.5, 10]), **cfg) == []


def test_oscillation_window_limits_reversal_count():
    # reversals at points 3 and 9 are 6 apart: with a window of 5 they never count together
    cfg = dict(osc_ema_alpha=1.0, osc_rel_amplitude=0.10, osc_window=5, osc_min_reversals=2)
    vals = [10, 12, 10, 9.9, 9.8, 9.7, 9.6, 9.5, 12]
    assert alerts_for(losses(vals), **cfg) == []
    cfg["osc_window"] = 7
    assert summary(alerts_for(losses(vals), **cfg)) == [(9, "oscillation")]


def test_oscillating_loss_series_with_default_config():
    vals = [3.0 * (1 + 0.25 * math.sin(2 * math.pi * t / 8)) for t in range(100)]
    alerts = alerts_for(losses(vals))
    assert [a.kind for a in alerts] == ["oscillation"]
    assert 8 <= alerts[0].step <= 30


def test_single_jump_and_steady_decrease_do_not_oscillate():
    jump = [3.0] * 50 + [5.0] * 50  # e.g. a curriculum stage switch
    decay = [2 + 6 * math.exp(-t / 30) for t in range(300)]
    assert [a for a in alerts_for(losses(jump)) if a.kind == "oscillation"] == []
    assert alerts_for(losses(decay)) == []


def test_oscillation_rearms_after_quiet_period():
    recs = list(synth_records(400, seed=3, n_layers=0, oscillate=(50, 110)))
    quiet_then_again = [dict(r) for r in recs]
    for r in quiet_then_again:
        s = r.get("step", 0)
        if 250 <= s < 310 and "loss/total" in r:
            r["loss/total"] *= 1 + 0.25 * math.sin(2 * math.pi * (s - 250) / 8)
    osc = [a.step for a in alerts_for(quiet_then_again) if a.kind == "oscillation"]
    assert len(osc) == 2
    assert 50 < osc[0] < 110 and 250 < osc[1] < 310


def test_only_train_lines_feed_loss_detectors():
    recs = losses([10, 12, 10.5, 12, 10.5])
    for r in recs:
        r["event"] = "eval"
    cfg = dict(osc_ema_alpha=1.0, osc_rel_amplitude=0.10, osc_window=10, osc_min_reversals=2)
    assert alerts_for(recs, **cfg) == []


# -- plateau ------------------------------------------------------------------------------
def test_plateau_fires_when_newer_half_is_not_lower():
    vals = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1] + [1.0] * 12
    # window 10: steps 11..18 still have a higher older half; at step 19 all ten values are 1.0
    alerts = alerts_for(losses(vals), plateau_window=10)
    assert summary(alerts) == [(19, "plateau")]
    assert alerts[0].message == "loss not decreasing over 10 steps (mean 1 -> 1)"


def test_plateau_min_relative_decrease():
    vals = [10.0 - 0.001 * i for i in range(40)]  # decreasing, but by only ~0.05% per half window
    assert alerts_for(losses(vals), plateau_window=20) == []
    assert summary(alerts_for(losses(vals), plateau_window=20, plateau_min_rel_decrease=0.01)) == [(20, "plateau")]


def decreasing(n, start, rate=0.02):
    return [start * (1 - rate) ** i for i in range(n)]


@pytest.mark.parametrize("key, values", [
    ("curriculum/stage", ["teacher"] * 12 + ["mixed"] * 12),
    ("curriculum/mixing_ratio", [0.0] * 12 + [0.5] * 12),
    ("sequential/layer", [14] * 12 + [15] * 12),
    ("difficulty/keep", [0.5 + 0.5 * min(i, 12) / 12 for i in range(24)]),
    ("kd/weight", [0.1 + 0.6 * min(i, 12) / 12 for i in range(24)]),
])
def test_plateau_restarts_when_the_schedule_moves_the_loss(key, values):
    """A loss that falls steadily within each regime but jumps up where the schedule changes (by design)."""
    vals = decreasing(12, 5.0) + decreasing(12, 9.0)
    if key in ("difficulty/keep", "kd/weight"):  # ramps: the loss rises with the weight, then falls
        vals = [5.0 + 0.3 * i for i in range(12)] + decreasing(12, 9.0)
    recs = [{**r, key: v} for r, v in zip(losses(vals), values)]
    assert alerts_for(losses(vals), plateau_window=10), "without the schedule key the jump looks like a plateau"
    assert alerts_for(recs, plateau_window=10) == []
    flat = [{**r, key: values[-1]} for r in losses([3.0] * 24, start_step=25)]
    assert summary(alerts_for(recs + flat, plateau_window=10)) == [(34, "plateau")]  # a real one still fires


def test_plateau_restarts_after_a_step_rewind():
    before = losses(decreasing(15, 5.0))
    resumed = losses(decreasing(15, 5.0 * 0.98 ** 6), start_step=7)  # resumed from the step-6 checkpoint
    assert alerts_for(before + resumed, plateau_window=10) == []


# -- whole streams ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_clean_converging_run_raises_nothing(seed):
    batch, corrupt = parse_lines(synth_lines(3000, seed=seed, eval_every=250))
    assert corrupt == []
    assert AlertEngine().feed(batch) == []


def test_faulty_run_raises_each_alert_once_in_file_order():
    lines = synth_lines(600, nan_at={100}, kl_at={150: 9.4}, grad_spike_at={300: 40.0}, oscillate=(400, 460))
    batch, _ = parse_lines(lines)
    alerts = AlertEngine().feed(batch)
    assert [(a.step, a.kind) for a in alerts if a.kind != "oscillation"] == [
        (100, "nonfinite"),
        (100, "skipped"),
        (150, "kl_high"),
        (300, "grad_spike"),
    ]
    osc = [a for a in alerts if a.kind == "oscillation"]
    assert len(osc) == 1 and 400 < osc[0].step < 460
    assert [a.line_no for a in alerts] == sorted(a.line_no for a in alerts)


def test_streaming_in_small_batches_matches_one_batch():
    lines = synth_lines(600, nan_at={100}, kl_at={150: 9.4}, grad_spike_at={300: 40.0}, oscillate=(400, 460))
    whole, _ = parse_lines(lines)
    expected = AlertEngine().feed(whole)
    engine = AlertEngine()
    got = []
    for i in range(0, len(lines), 7):
        batch, _ = parse_lines(lines[i : i + 7], first_line_no=i + 1)
        got.extend(engine.feed(batch))
    assert got == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_default_oscillation_thresholds_ignore_3_percent_noise_but_catch_10_percent_swings(seed):
    noisy = list(synth_records(5000, seed=seed, noise=0.03, n_layers=0))
    assert [a for a in alerts_for(noisy) if a.kind == "oscillation"] == []
    for period in (8, 30):
        swings = list(synth_records(1000, seed=seed, noise=0.02, n_layers=0, oscillate=(400, 520), osc_amplitude=0.10, osc_period=period))
        osc = [a.step for a in alerts_for(swings) if a.kind == "oscillation"]
        assert len(osc) == 1 and 400 < osc[0] < 520
