"""npt-monitor: pure alert detectors, with exact expectations."""

from __future__ import annotations

import math

import pytest

import numpy as np

from npt_monitor.alerts import AlertConfig, AlertEngine, periodicity
from npt_monitor.parsing import Batch, parse_lines
from npt_monitor.synth import synth_lines, synth_records


def alerts_for(records, **cfg):
    """As ``--check`` sees a complete file: feed it, then the verdicts still waiting for later lines."""
    engine = AlertEngine(AlertConfig(**cfg))
    return engine.feed(Batch.from_dicts(records)) + engine.finish()


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
    assert alerts[0].message == "grad_norm 6 = 6.0x median 1; clip norm unknown; loss follow-up unknown"
    assert [a.severity for a in alerts] == ["warning", "warning"]


def spike_run(after, clip=0.5, spike=40.0):
    """30 steps of loss 10 / grad 1, a spike at step 31, then `after` losses (grad 1)."""
    recs = [{"step": 0, "event": "start", "run/grad_clip": clip}] if clip is not None else []
    recs += [{"step": s, "loss/total": 10.0 + 0.1 * (s % 3), "grad_norm": 1.0} for s in range(1, 31)]
    recs.append({"step": 31, "loss/total": 10.0, "grad_norm": spike})
    recs += [{"step": 32 + j, "loss/total": v, "grad_norm": 1.0} for j, v in enumerate(after)]
    return recs


def test_clipped_spike_after_which_the_loss_returns_is_an_info_note():
    alerts = alerts_for(spike_run([10.2, 10.0, 10.5, 9.9, 10.1, 10.0]))
    assert [(a.step, a.kind, a.severity) for a in alerts] == [(31, "grad_spike", "info")]
    assert alerts[0].message == "grad_norm 40 = 40.0x median 1; clipped; loss back on trend (10.1 vs 10.1)"
    assert alerts[0].line_no == 32  # the spike's own line, although judged five lines later


@pytest.mark.parametrize("clip, how", [(0.5, "clipped"), (100.0, "not clipped"), (None, "clip norm unknown")])
def test_a_spike_the_loss_followed_is_a_warning_and_one_it_absorbed_a_note_whatever_the_clipping(clip, how):
    """Older streams (and other tools') log no run/grad_clip: an absorbed spike is still only a note."""
    followed = alerts_for(spike_run([14.0, 15.0, 16.0, 15.5, 16.0], clip=clip))
    assert [(a.step, a.kind, a.severity) for a in followed] == [(31, "grad_spike", "warning")]
    assert followed[0].message == f"grad_norm 40 = 40.0x median 1; {how}; loss followed it (15.5 vs trend 10.1)"
    absorbed = alerts_for(spike_run([10.2, 10.0, 10.5, 9.9, 10.1], clip=clip))
    assert [(a.step, a.kind, a.severity) for a in absorbed] == [(31, "grad_spike", "info")]
    assert absorbed[0].message == f"grad_norm 40 = 40.0x median 1; {how}; loss back on trend (10.1 vs 10.1)"


def test_grad_clip_flag_stands_in_for_the_start_line():
    alerts = alerts_for(spike_run([10.0] * 5, clip=None), grad_clip=0.5)
    assert alerts[0].severity == "info" and "; clipped;" in alerts[0].message


def test_grad_spike_needs_history():
    recs = [{"step": i + 1, "grad_norm": g} for i, g in enumerate([1.0] * 5 + [50.0])]
    assert alerts_for(recs) == []


# -- oscillation --------------------------------------------------------------------------
def noisy(n, level=10.0, noise=0.03, seed=0):
    rng = np.random.default_rng(seed)
    return list(level * (1 + noise * rng.standard_normal(n)))


def test_periodicity_reads_period_amplitude_and_noise_floor_exactly():
    t = np.arange(64)
    clean = 10.0 * (1 + 0.1 * np.sin(2 * np.pi * t / 8))
    ratio, amp, period, ac = periodicity(clean[None, :])
    assert period[0] == 8 and amp[0] == pytest.approx(0.1, rel=0.02) and ratio[0] > 1e3 and ac[0] > 0.95
    rows = np.array([noisy(64, seed=s) for s in range(200)])
    ratio, amp, _, _ = periodicity(rows)
    assert np.median(ratio) < 8 and ratio.max() < 40 and amp.max() < 0.02  # white noise: no line stands out


def test_oscillation_is_judged_against_the_runs_own_noise():
    """The same +-4 % swing: an alarm on a 0.5 %-noise run, not on a 6 %-noise run (where it is noise-sized)."""
    swing = [1 + 0.04 * math.sin(2 * math.pi * t / 8) for t in range(120)]
    quiet = [v * s for v, s in zip(noisy(120, noise=0.005, seed=1), swing)]
    loud = [v * s for v, s in zip(noisy(120, noise=0.06, seed=1), swing)]
    assert [a.kind for a in alerts_for(losses(quiet))] == ["oscillation"]
    assert alerts_for(losses(loud)) == []
    flat = alerts_for(losses(noisy(2000, noise=0.10, seed=2)))  # +-10 % batch noise alone (a plateau, though)
    assert [a for a in flat if a.kind == "oscillation"] == []


def test_oscillation_thresholds_are_flags():
    swing = [10 * (1 + 0.1 * math.sin(2 * math.pi * t / 8)) * (1 + 0.02 * n) for t, n in
             enumerate(np.random.default_rng(0).standard_normal(100))]
    assert [a.kind for a in alerts_for(losses(swing))] == ["oscillation"]
    assert alerts_for(losses(swing), osc_power_ratio=1e9) == []
    assert alerts_for(losses(swing), osc_min_amplitude=0.2) == []
    assert alerts_for(losses(swing), osc_min_autocorr=1.01) == []


def test_oscillation_window_restarts_at_a_stage_change():
    vals = [3.0] * 40 + [5.0 + 0.02 * math.sin(t) for t in range(60)]
    recs = [{**r, "curriculum/stage": "teacher" if r["step"] <= 40 else "mixed"} for r in losses(vals)]
    assert alerts_for(recs) == []


def test_oscillating_loss_series_with_default_config():
    vals = [3.0 * (1 + 0.25 * math.sin(2 * math.pi * t / 8)) for t in range(100)]
    alerts = alerts_for(losses(vals))
    assert [a.kind for a in alerts] == ["oscillation"]
    # judged from osc_min_points (32) losses on, then held for osc_persist_cycles (4) periods of 8 steps
    assert 32 + 4 * 8 <= alerts[0].step <= 72
    assert alerts[0].message == ("loss oscillating: period ~8 steps, amplitude 25% of the loss, "
                                 f"{alerts[0].message.split(', ')[2]}, held for 4 periods (last {alerts[0].step} steps)")


def test_single_jump_and_steady_decrease_do_not_oscillate():
    jump = [3.0] * 50 + [5.0] * 50  # e.g. a curriculum stage switch
    decay = [2 + 6 * math.exp(-t / 30) for t in range(300)]
    assert [a for a in alerts_for(losses(jump)) if a.kind == "oscillation"] == []
    assert alerts_for(losses(decay)) == []


def test_oscillation_rearms_after_quiet_period():
    vals = noisy(700, noise=0.01, seed=3)
    for start in (100, 450):
        for s in range(start, start + 100):
            vals[s] *= 1 + 0.1 * math.sin(2 * math.pi * (s - start) / 8)
    osc = [a.step for a in alerts_for(losses(vals)) if a.kind == "oscillation"]
    assert len(osc) == 2
    assert 100 < osc[0] < 200 and 450 < osc[1] < 550


def test_only_train_lines_feed_loss_detectors():
    recs = losses([3.0 * (1 + 0.25 * math.sin(2 * math.pi * t / 8)) for t in range(100)])
    for r in recs:
        r["event"] = "eval"
    assert alerts_for(recs) == []


# -- plateau ------------------------------------------------------------------------------
def test_plateau_fires_when_newer_half_is_not_lower():
    vals = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1] + [1.0] * 12
    # window 10: steps 11..18 still have a higher older half; at step 19 all ten values are 1.0
    alerts = alerts_for(losses(vals), plateau_window=10)
    assert summary(alerts) == [(19, "plateau")]
    assert alerts[0].message == "loss not decreasing over 10 steps (mean 1 -> 1, noise se 0)"


def test_plateau_min_relative_decrease():
    vals = [10.0 - 0.001 * i for i in range(40)]  # decreasing, but by only ~0.05% per half window
    assert alerts_for(losses(vals), plateau_window=20) == []
    assert summary(alerts_for(losses(vals), plateau_window=20, plateau_min_rel_decrease=0.01)) == [(20, "plateau")]


def power_law_run(n, noise, seed, decay=0.15):
    """A healthy long run: the loss keeps falling as a power law (slowly, late on) under batch noise."""
    t = np.arange(n)
    return list(3.0 * (1 + t / 50) ** -decay * (1 + noise * np.random.default_rng(seed).standard_normal(n)))


@pytest.mark.parametrize("seed", range(4))
def test_plateau_is_judged_against_the_runs_own_noise(seed):
    """A slow healthy decrease under 5 % noise: the halves' means cross by chance late on, which the plain
    'newer mean not lower' rule (z = 0) takes for a plateau; judged against the noise it stays silent.
    The same noise on a flat loss is a plateau, found within three windows."""
    healthy = losses(power_law_run(6000, 0.05, seed))
    assert [a for a in alerts_for(healthy) if a.kind == "plateau"] == []
    assert [a.kind for a in alerts_for(healthy, plateau_noise_z=0) if a.kind == "plateau"][:1] == ["plateau"]
    flat = [a.step for a in alerts_for(losses(noisy(6000, level=3.0, noise=0.05, seed=seed))) if a.kind == "plateau"]
    assert flat and 500 <= flat[0] <= 1500


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
    plateaus = [a for a in alerts_for(recs + flat, plateau_window=10) if a.kind == "plateau"]
    assert summary(plateaus) == [(34, "plateau")]  # a real one still fires


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
    for period, within in ((8, 60), (30, 200)):  # the mixed stage runs from step 200 to 600
        swings = list(synth_records(1000, seed=seed, noise=0.02, n_layers=0, oscillate=(300, 590), osc_amplitude=0.10,
                                    osc_period=period))
        osc = [a.step for a in alerts_for(swings) if a.kind == "oscillation"]
        assert len(osc) == 1 and 300 + 4 * period < osc[0] < 300 + within


# -- per-rank: straggler, memory, throughput --------------------------------------------------
def rank_lines(n, slow_rank=None, from_step=1, factor=2.5):
    out = []
    for s in range(1, n + 1):
        own = [0.10, 0.104]
        if slow_rank is not None and s >= from_step:
            own[slow_rank] = 0.10 * factor
        out.append({"step": s, "loss/total": 5.0, "time/step_max_s": max(own), "time/step_median_s": sum(own) / 2,
                    "time/slowest_rank": own.index(max(own))})
    return out


def test_straggler_names_the_rank_after_k_consecutive_log_steps():
    alerts = alerts_for(rank_lines(30, slow_rank=1, from_step=11))
    assert summary(alerts) == [(15, "straggler")]  # steps 11..15: five log steps in a row
    assert alerts[0].message == "rank 1 is a straggler: its step 0.25 s = 1.43x the median rank's 0.175 s for 5 log steps"


def test_straggler_threshold_and_run_length_are_flags_and_healthy_ranks_stay_silent():
    assert alerts_for(rank_lines(30)) == []
    assert alerts_for(rank_lines(30, slow_rank=0, from_step=1, factor=1.5)) == []  # 0.15/0.127 = 1.18x < 1.3
    assert summary(alerts_for(rank_lines(30, slow_rank=0, factor=1.5), straggler_factor=1.1)) == [(5, "straggler")]
    assert alerts_for(rank_lines(30, slow_rank=1, from_step=11), straggler_consecutive=25) == []


def every_key_lines(n, slow_from=11):
    """Two ranks' own step times under every key the trainer writes; rank 1 at 0.25 s from `slow_from` on."""
    out = []
    for s in range(1, n + 1):
        own = [0.10, 0.25 if s >= slow_from else 0.104]
        out.append({"step": s, "loss/total": 5.0, "time/step_max_s": max(own), "time/step_min_s": min(own),
                    "time/step_median_s": sum(own) / 2, "time/slowest_rank": own.index(max(own)),
                    "rank/0/step_s": own[0], "rank/1/step_s": own[1]})
    return out


@pytest.mark.parametrize("keep, message", [
    (("time/step_max_s", "time/step_median_s", "time/slowest_rank"),
     "rank 1 is a straggler: its step 0.25 s = 1.43x the median rank's 0.175 s for 5 log steps"),
    (("time/step_max_s", "time/step_median_s"),
     "a rank (not named) is a straggler: its step 0.25 s = 1.43x the median rank's 0.175 s for 5 log steps"),
    (("time/step_max_s", "time/step_min_s"),
     "a rank (not named) is a straggler: its step 0.25 s = 2.50x the fastest rank's 0.1 s for 5 log steps"),
    (("time/step_max_s", "time/step_min_s", "time/slowest_rank"),
     "rank 1 is a straggler: its step 0.25 s = 2.50x the fastest rank's 0.1 s for 5 log steps"),
    (("rank/0/step_s", "rank/1/step_s"),
     "rank 1 is a straggler: its step 0.25 s = 1.43x the median rank's 0.175 s for 5 log steps"),
], ids=["max-median-rank", "max-median", "max-min", "max-min-rank", "ranks-only"])
def test_straggler_is_judged_from_whatever_the_stream_has(keep, message):
    recs = [{k: v for k, v in r.items() if k in keep or k in ("step", "loss/total")} for r in every_key_lines(40)]
    alerts = alerts_for(recs)
    assert summary(alerts) == [(15, "straggler")] and alerts[0].message == message
    assert alerts_for(recs[:10]) == []  # 0.104 / 0.1 = 1.04x: healthy
    engine = AlertEngine()  # fed line by line (a live tail) the verdict is the same
    assert [a for k, r in enumerate(recs) for a in engine.feed(Batch.from_dicts([r], k + 1))] == alerts


def test_straggler_fires_once_per_slow_stretch_even_when_the_slowest_rank_changes():
    recs = every_key_lines(40)
    for r in recs[20:30]:  # rank 0 is the slow one for a while: still the same stretch of slow lines
        r.update({"time/slowest_rank": 0, "rank/0/step_s": 0.26})
    for r in recs[30:32]:  # healthy again, then rank 1 slow again: a new stretch
        r.update({"time/step_max_s": 0.104, "time/step_median_s": 0.102})
    alerts = alerts_for(recs)
    assert summary(alerts) == [(15, "straggler"), (37, "straggler")]
    engine = AlertEngine()
    assert [a for i in range(0, 40, 3) for a in engine.feed(Batch.from_dicts(recs[i : i + 3], i + 1))] == alerts


def mem_run(values):
    recs = []
    for j, m in enumerate(values):
        step = 10 * (j + 1)
        recs += [{"step": step, "loss/total": 5.0, "mem/peak_alloc_gb": m}, {"step": step, "event": "eval"},
                 {"step": step, "event": "checkpoint"}]
    return recs


def test_memory_growth_across_evals_and_checkpoints():
    alerts = alerts_for(mem_run([1.0, 1.1, 1.2, 1.3, 1.3]))
    assert summary(alerts) == [(40, "memory_growth")]
    assert alerts[0].message == "peak memory rising at 3 evals/checkpoints in a row: 1 -> 1.1 -> 1.2 -> 1.3 GB (steps 10..40)"
    assert alerts_for(mem_run([1.0, 1.1, 1.1, 1.2, 1.2, 1.2])) == []  # rises, but not steadily
    assert alerts_for(mem_run([1.0, 1.01, 1.015, 1.02])) == []  # below memory_growth_min_rel
    assert alerts_for(mem_run([1.0, 1.1, 1.2, 1.3]), memory_growth_marks=4) == []


def test_throughput_drop_against_its_running_median_ignoring_the_lines_after_an_eval():
    rates = [1000.0] * 30
    recs = [{"step": s + 1, "loss/total": 5.0, "tokens_per_s": r} for s, r in enumerate(rates)]
    recs.insert(20, {"step": 20, "event": "eval"})
    recs[21]["tokens_per_s"] = recs[22]["tokens_per_s"] = 50.0  # their windows hold the eval
    assert alerts_for(recs) == []
    slow = recs + [{"step": 31 + s, "loss/total": 5.0, "tokens_per_s": 600.0} for s in range(10)]
    alerts = alerts_for(slow)
    assert summary(alerts) == [(36, "throughput_drop")]  # step 36: six of the last ten at 600 (0.6x)
    assert alerts_for(slow, throughput_factor=0.5) == []


def test_throughput_median_restarts_on_a_ramp_and_still_catches_a_drop_after_it():
    """A mixing ratio that changes on every line restarts the median on every line (nothing to judge
    there, even at 0.5x); once the stage holds still, a drop is caught as in a run without a ramp."""
    ramp = [{"step": s, "curriculum/mixing_ratio": s / 100, "tokens_per_s": 1000.0 if s % 2 else 500.0}
            for s in range(1, 101)]
    steady = [{"step": 100 + s, "curriculum/mixing_ratio": 1.0, "tokens_per_s": 1000.0} for s in range(1, 31)]
    slow = [{"step": 130 + s, "curriculum/mixing_ratio": 1.0, "tokens_per_s": 600.0} for s in range(1, 11)]
    assert alerts_for(ramp + steady) == []
    assert summary(alerts_for(ramp + steady + slow)) == [(136, "throughput_drop")]
    # fed line by line (the tail of a live run) the verdict is the same
    engine = AlertEngine()
    got = [a for r in ramp + steady + slow for a in engine.feed(Batch.from_dicts([r]))]
    assert summary(got) == [(136, "throughput_drop")]


def test_grad_spike_bound_by_the_trailing_minimum_is_exact_when_every_line_is_a_candidate():
    """Norms of 1 with a dip to 0.1 every 10th step: every line is over 5x the trailing minimum, the
    cheap bound, so each one gets the exact median (1): none is a spike, the real one (9x) is found."""
    norms = [0.1 if s % 10 == 0 else 1.0 for s in range(200)]
    norms[150] = 9.0
    recs = [{"step": s + 1, "loss/total": 3.0, "grad_norm": g} for s, g in enumerate(norms)]
    alerts = alerts_for(recs)
    assert summary(alerts) == [(151, "grad_spike")]
    assert alerts[0].message.startswith("grad_norm 9 = 9.0x median 1")


def test_check_exits_1_on_warnings_and_errors_only(tmp_path):
    import json

    from npt_monitor.cli import run_check

    info = tmp_path / "info.jsonl"
    info.write_text("".join(json.dumps(r) + "\n" for r in spike_run([10.0] * 6)))
    out = __import__("io").StringIO()
    assert run_check([info], AlertConfig(), out=out, err=__import__("io").StringIO()) == 0
    assert "INFO grad_spike" in out.getvalue()
    warn = tmp_path / "warn.jsonl"
    warn.write_text("".join(json.dumps(r) + "\n" for r in spike_run([16.0] * 6)))
    assert run_check([warn], AlertConfig(), out=__import__("io").StringIO(), err=__import__("io").StringIO()) == 1


@pytest.mark.parametrize("clip, how", [(0.5, "clipped"), (None, "clip norm unknown")])
def test_a_spike_at_a_stage_change_is_a_note_even_though_the_loss_moves(clip, how):
    """multi_layer demo: the last teacher step spikes, then the mixed stage runs at a higher loss by design
    (older streams log no clip norm: the jump is by design all the same)."""
    recs = spike_run([16.0, 17.0, 16.5, 16.8, 16.2], clip=clip)
    for r in recs:
        if "loss/total" in r:
            r["curriculum/stage"] = "teacher" if r["step"] <= 31 else "mixed"
    alerts = alerts_for(recs)
    assert [(a.step, a.severity) for a in alerts] == [(31, "info")]
    assert alerts[0].message == f"grad_norm 40 = 40.0x median 1; {how}; at a curriculum/sequential stage change"
    assert alerts_for(recs, stage_keys=())[0].severity == "warning"  # without the stage: the loss followed


# -- instability --------------------------------------------------------------------------
def shaped_run(n=600, seed=0, **shape):
    """The synthetic run (loss 2 + 6 exp(-3 t / n), curriculum stages at 20 % and 60 %) with a loss shape."""
    return list(synth_records(n, seed=seed, n_layers=0, **shape))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape, onset, says", [
    (dict(flip_flop=(300, 2)), 300, "x the run's earlier"),
    (dict(flip_flop=(300, 3)), 300, "x the run's earlier"),
    (dict(flip_flop=(1, 2)), 1, "from the start: no earlier noise to compare; period ~2 steps"),
    (dict(flip_flop=(1, 3)), 1, "from the start: no earlier noise to compare; period ~3 steps"),
    (dict(jitter=((1, 0.40),)), 1, "from the start: no earlier noise to compare; no fixed period"),
    (dict(jitter=((1, 0.05), (300, 0.40))), 300, "x the run's earlier"),
], ids=["flip-flop-2", "flip-flop-3", "flip-flop-2-from-the-start", "flip-flop-3-from-the-start",
        "aperiodic-40-from-the-start", "noise-5-to-40-halfway"])
def test_instability_fires_within_30_train_lines_of_onset(shape, onset, says, seed):
    """The issue's shapes: +-a % is loss = trend x (1 + u), u uniform in [-a, a], one draw per train line;
    a flip-flop swings +-50 % of the level."""
    found = [a for a in alerts_for(shaped_run(seed=seed, **shape)) if a.kind == "instability"]
    assert len(found) == 1  # one episode, across the stage change at step 360 too
    assert onset <= found[0].step < onset + 30 and found[0].severity == "warning"
    assert found[0].message.startswith("loss swinging around its trend: mean |loss - trend| = ")
    assert says in found[0].message


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("a", [0.10, 0.20])
def test_instability_stays_silent_on_batch_noise_around_a_decreasing_loss(a, seed):
    alerts = alerts_for(shaped_run(3000, seed=seed, jitter=((1, a),)))
    assert [x.format() for x in alerts if x.kind in ("instability", "oscillation")] == []


def test_instability_is_judged_against_the_runs_earlier_noise():
    """+-40 % noise all along: flagged once at the start (nothing earlier to compare with), then it is the run's
    own noise; the same +-40 % after +-5 % is a new swing, unless it is not instab_noise_factor x the earlier."""
    steady = [a.step for a in alerts_for(shaped_run(2000, jitter=((1, 0.40),))) if a.kind == "instability"]
    assert len(steady) == 1 and steady[0] < 30
    late = shaped_run(2000, jitter=((1, 0.05), (1000, 0.40)))
    jump = [a.step for a in alerts_for(late) if a.kind == "instability"]
    assert len(jump) == 1 and 1000 <= jump[0] < 1030
    assert [a for a in alerts_for(late, instab_noise_factor=50.0) if a.kind == "instability"] == []


def test_a_level_step_or_a_slow_wave_is_not_instability():
    """A step moves one step-to-step change only, a slow wave each change a little: neither swings."""
    step = losses([3.0] * 50 + [5.0] * 50)
    wave = losses([5.0 * (1 + 0.4 * math.sin(2 * math.pi * t / 40)) for t in range(200)])
    assert [a for a in alerts_for(step) + alerts_for(wave) if a.kind == "instability"] == []


def test_instability_window_restarts_at_a_stage_change_and_streams_like_one_batch():
    lines = synth_lines(600, n_layers=0, jitter=((1, 0.05), (300, 0.40)))
    whole = AlertEngine().feed(parse_lines(lines)[0])
    engine = AlertEngine()
    parts = [a for i in range(0, len(lines), 7) for a in engine.feed(parse_lines(lines[i : i + 7], i + 1)[0])]
    assert parts == whole and [a.kind for a in whole] == ["instability"]


# -- slow drift -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_slow_drift_that_follows_the_data_is_not_oscillation(seed):
    """The issue's upper-half run: 960 steps, the loss drifting in waves of ~30 steps and ~10 % (here smoothed
    white noise of 6 % standard deviation: the difficulty of text streamed in order) on 2 % batch noise, while
    held-out perplexity keeps falling.  The old rule (two cycles in the window, no persistence) calls it an
    oscillation; four cycles held for four more periods do not: a drift's waves change their length from one to
    the next.  A periodic swing of the same size and period in the same run is still caught."""
    drift = shaped_run(960, seed=seed, noise=0.02, drift=(0.06, 30), eval_every=80)
    ppl = [r["eval/ppl_npt"] for r in drift if r.get("event") == "eval"]
    assert ppl == sorted(ppl, reverse=True)
    assert [a.format() for a in alerts_for(drift) if a.severity in ("warning", "error")] == []
    assert "oscillation" in [a.kind for a in alerts_for(drift, osc_min_cycles=2, osc_persist_cycles=0)]
    periodic = shaped_run(960, seed=seed, noise=0.02, oscillate=(360, 700), osc_amplitude=0.10, osc_period=30)
    assert [a.kind for a in alerts_for(periodic) if a.severity == "warning"] == ["oscillation"]


# -- abort events -------------------------------------------------------------------------------
def test_an_abort_event_is_a_stall_alert_naming_the_ranks_and_their_phase():
    train = [{"step": s, "loss/total": 3.0} for s in range(30, 36)]
    watchdog = {"step": 35, "event": "abort", "reason": "stalled", "missing_ranks": [1], "rank_steps": {"1": 35},
                "rank_phases": {"1": "forward"}, "error": "rank 1 wrote no heartbeat for 120 s"}
    alerts = alerts_for(train + [watchdog])
    assert [(a.step, a.kind, a.severity) for a in alerts] == [(35, "stall", "error")]
    assert alerts[0].message == ("run aborted (stalled): rank 1 missing (rank 1 at step 35, forward); "
                                 "rank 1 wrote no heartbeat for 120 s")
    today = {"step": 35, "event": "abort", "missing_ranks": None, "error": "DistBackendError: timed out"}
    assert alerts_for(train + [today])[0].message == "run aborted: missing ranks unknown; DistBackendError: timed out"
    lost = {"step": 35, "event": "abort", "reason": "lost", "missing_ranks": [2, 3], "error": "x"}
    assert alerts_for(train + [lost])[0].message == "run aborted (lost): ranks 2, 3 missing; x"
