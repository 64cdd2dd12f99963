"""npt-monitor Textual app driven with App.run_test() + Pilot, fed from JSONL files in tmp_path."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest

from npt_monitor.app import MonitorApp, make_app
from npt_monitor.synth import synth_lines
from npt_monitor.widgets import AlertsPanel, HelpScreen, MetricPickerScreen, MetricPlot, RunHeader, RunView

pytestmark = pytest.mark.timeout(60)

FAST = dict(poll_interval=0.03, refresh_interval=0.03)


def write_run(path: Path, n: int, tail: str = "", **faults) -> Path:
    """A realistic converging run of ``n`` steps (see npt_monitor.synth), plus optional faults."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(synth_lines(n, **faults)) + "\n" + tail)
    return path


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


async def wait_for(pilot, cond, timeout: float = 8.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.03)


def header(app: MonitorApp, i: int = 0) -> RunHeader:
    return app.query_one(f"#run-{i}", RunView).query_one(RunHeader)


def panel(app: MonitorApp, i: int = 0) -> AlertsPanel:
    return app.query_one(f"#run-{i}", RunView).query_one(AlertsPanel)


def shown_step(app, i=0):
    return header(app, i).info.step


def run_app(app: MonitorApp, body, size=(120, 40)):
    async def main():
        async with app.run_test(size=size) as pilot:
            await body(pilot)

    asyncio.run(main())


@pytest.mark.parametrize(
    "faults, expected",
    [
        (dict(nan_at={120}), [(120, "nonfinite"), (120, "skipped")]),
        (dict(kl_at={150: 9.4}), [(150, "kl_high")]),
        (dict(oscillate=(250, 390)), [("osc", "oscillation")]),
        ({}, []),  # a clean converging run raises nothing
    ],
    ids=["nan", "kl-9.4", "oscillation", "clean"],
)
def test_fixture_runs_raise_the_right_alerts(tmp_path, faults, expected):
    path = write_run(tmp_path / "run" / "metrics.jsonl", 400, **faults)
    app = make_app([path.parent], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 400, what="step 400")
        got = [(a.step, a.kind) for a in panel(app).alerts]
        if expected and expected[0][0] == "osc":
            assert [k for _, k in got] == ["oscillation"]
            assert 250 < got[0][0] < 390
        else:
            assert got == expected
        assert panel(app).option_count == len(expected)
        assert panel(app).border_title == f"Alerts ({len(expected)})"
        assert header(app).n_alerts == len(expected)

    run_app(app, body)


def test_appending_lines_updates_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = synth_lines(300)
    path.write_text("\n".join(lines[:101]) + "\n")  # start line + steps 1..100
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 100, what="step 100")
        append(path, "\n".join(lines[101:151]) + "\n")
        await wait_for(pilot, lambda: shown_step(app) == 150, timeout=3, what="step 150 after append")
        view = app.query_one(RunView)
        assert view.run.state.series["loss/total"].count == 150
        plot = view.query_one(".loss-plot", MetricPlot)
        # plot follows the new data (within a few refresh ticks: plots redraw at most every plot_interval)
        await wait_for(pilot, lambda: plot.version == view.run.state.version, timeout=3, what="plot redrawn")

    run_app(app, body)


def test_half_written_line_and_truncation_do_not_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = synth_lines(200, kl_at={30: 9.4})
    path.write_text("\n".join(lines[:101]) + "\n")
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 100)
        assert [a.kind for a in panel(app).alerts] == ["kl_high"]
        half = len(lines[101]) // 2
        append(path, lines[101][:half])  # writer flushed half a line
        await pilot.pause(0.3)
        assert shown_step(app) == 100 and header(app).info.corrupt == 0
        append(path, lines[101][half:] + "\n")
        await wait_for(pilot, lambda: shown_step(app) == 101, what="completed line")
        # truncate: the trainer restarted and rewrote the file
        path.write_text("\n".join(lines[:11]) + "\n")
        await wait_for(pilot, lambda: shown_step(app) == 10, what="reload after truncation")
        assert panel(app).alerts == [] and panel(app).option_count == 0
        view = app.query_one(RunView)
        assert view.run.resets == 1 and view.run.last_reset_reason == "truncated"
        append(path, "\n".join(lines[11:41]) + "\n")
        await wait_for(pilot, lambda: shown_step(app) == 40)
        assert [(a.step, a.kind) for a in panel(app).alerts] == [(30, "kl_high")]

    run_app(app, body)


def test_corrupt_lines_are_counted_not_fatal(tmp_path):
    lines = synth_lines(50)
    lines[5] = "{not json"
    lines[6] = "[1, 2]"
    path = write_run(tmp_path / "m.jsonl", 0)
    path.write_text("\n".join(lines) + "\n")
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 50)
        assert header(app).info.corrupt == 2
        state = app.query_one(RunView).run.state
        assert [c.line_no for c in state.corrupt_samples] == [6, 7]

    run_app(app, body)


def test_waits_for_a_file_that_does_not_exist_yet(tmp_path):
    run_dir = tmp_path / "later"
    app = make_app([run_dir], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: header(app).info.waiting, what="waiting state")
        assert shown_step(app) is None
        write_run(run_dir / "metrics.jsonl", 20)
        await wait_for(pilot, lambda: shown_step(app) == 20, what="file to appear")
        assert not header(app).info.waiting

    run_app(app, body)


def test_pause_freezes_display_and_follow_resumes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = synth_lines(200)
    path.write_text("\n".join(lines[:51]) + "\n")
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 50)
        await pilot.press("p")
        assert app.paused and header(app).mode == "paused"
        append(path, "\n".join(lines[51:81]) + "\n")
        view = app.query_one(RunView)
        await wait_for(pilot, lambda: view.run.state.step == 80, what="model to keep reading")
        await wait_for(pilot, lambda: header(app).pending == 30, what="pending count")
        assert shown_step(app) == 50  # frozen
        await pilot.press("p")
        await wait_for(pilot, lambda: shown_step(app) == 80)
        assert header(app).mode == "live"
        await pilot.press("p")
        await pilot.press("f")  # follow also un-pauses
        assert not app.paused and app.jump_step is None

    run_app(app, body)


def test_alert_jump_moves_plots_to_the_alert_step(tmp_path):
    path = write_run(tmp_path / "m.jsonl", 1000, kl_at={300: 9.4}, nan_at={700})
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 1000)
        assert [(a.step, a.kind) for a in panel(app).alerts] == [(300, "kl_high"), (700, "nonfinite"), (700, "skipped")]
        await pilot.press("n")  # first alert
        await pilot.pause(0.1)
        assert app.jump_step == 300
        plots = list(app.query(MetricPlot))
        assert all(p.x_range == (200.0, 400.0) and p.marker == 300 for p in plots)
        assert header(app).mode == "jump"
        await pilot.press("down", "j")  # select the next alert in the list and jump
        await pilot.pause(0.1)
        assert app.jump_step == 700
        await pilot.press("z")  # zoom changes the span around the alert
        await pilot.pause(0.1)
        assert app.zoom == 5000 and plots[0].x_range == (700 - 2500, 700 + 2500)
        await pilot.press("f")
        await pilot.pause(0.1)
        assert app.jump_step is None and header(app).mode == "live"
        assert plots[0].x_range == (0, 5000)  # following with a 5000-step zoom

    run_app(app, body)


def test_help_and_quit_keys(tmp_path):
    path = write_run(tmp_path / "m.jsonl", 20)
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 20)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running

    run_app(app, body)


def test_metric_picker_changes_component_plot(tmp_path):
    path = write_run(tmp_path / "m.jsonl", 50)
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 50)
        comp = app.query_one(".components-plot", MetricPlot)
        assert comp.metrics == ("loss/direct", "loss/fidelity", "loss/guidance/attn", "loss/kd", "loss/reg")
        await pilot.press("m")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, MetricPickerScreen)
        assert "kd/kl" in screen.keys and "layer/3/v_a_attn_sim" in screen.keys
        from textual.widgets import SelectionList

        sl = screen.query_one(SelectionList)
        sl.deselect_all()
        sl.select("kd/kl")
        sl.select("grad_norm")
        await pilot.press("escape")
        await wait_for(pilot, lambda: comp.metrics == ("grad_norm", "kd/kl"), what="picked metrics")

    run_app(app, body)


def test_two_runs_side_by_side(tmp_path):
    a = write_run(tmp_path / "a" / "metrics.jsonl", 300, run_name="baseline")
    b = write_run(tmp_path / "b" / "metrics.jsonl", 250, run_name="high-lr", kl_at={100: 9.4})
    app = make_app([a.parent, b], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app, 0) == 300 and shown_step(app, 1) == 250)
        assert header(app, 0).info.name == "baseline" and header(app, 1).info.name == "high-lr"
        assert panel(app, 0).alerts == [] and [a.step for a in panel(app, 1).alerts] == [100]
        v0, v1 = app.query_one("#run-0", RunView), app.query_one("#run-1", RunView)
        assert v0.region.x < v1.region.x and v0.region.y == v1.region.y  # side by side
        await pilot.press("j")  # only run 1 has alerts: it is the one jumped to
        await pilot.pause(0.1)
        assert app.jump_step == 100
        assert all(p.marker == 100 for p in app.query(MetricPlot))  # both runs show that step

    run_app(app, body, size=(160, 44))


def test_nonfinite_values_render(tmp_path):
    # a NaN in a layer metric shows as NaN in the table and does not break the plots
    rec = json.loads(synth_lines(3)[-1])
    rec["layer/1/direct_mse"] = math.nan
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(synth_lines(2)) + "\n" + json.dumps(rec) + "\n")
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 3)
        from npt_monitor.widgets import LayerTable

        table = app.query_one(LayerTable)
        assert str(table.get_cell("1", "direct_mse")) == "NaN"
        assert [a.kind for a in panel(app).alerts] == ["nonfinite"]

    run_app(app, body)


def test_log_scale_toggle_and_zoom_shown_in_header(tmp_path):
    path = write_run(tmp_path / "m.jsonl", 300)
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 300)
        await pilot.press("l")
        await pilot.pause(0.1)
        assert app.log_y and all(p.log_y for p in app.query(MetricPlot))
        await pilot.press("z", "z")
        await pilot.pause(0.1)
        assert app.zoom == 1000 and header(app).zoom == 1000
        assert all(p.x_range == (0, 1000) for p in app.query(MetricPlot))
        await pilot.press("l")
        await pilot.pause(0.1)
        assert not any(p.log_y for p in app.query(MetricPlot))

    run_app(app, body)


def test_backlog_is_shown_when_loaded_without_a_spinner_or_waiting_for_the_timer(tmp_path):
    path = write_run(tmp_path / "m.jsonl", 1600)  # > 1 MiB: the tailer delivers it in several batches
    assert path.stat().st_size > 1 << 20
    app = make_app([path], poll_interval=0.03, refresh_interval=30.0)  # the refresh timer never fires here

    async def body(pilot):
        view = app.query_one(RunView)
        state = view.run.state
        covered = []

        def loaded():
            covered.append(view.loading)  # Textual's reactive: True would hide the view behind a spinner
            return shown_step(app) == 1600 and all(p.version == state.version for p in view.query(MetricPlot))

        await wait_for(pilot, loaded, what="the whole backlog on screen")
        assert view.n_batches >= 2 and not view.backlog
        assert not any(covered) and not list(app.query("LoadingIndicator"))
        assert panel(app).border_title == "Alerts (0)" and header(app).info.lines == 1601

    run_app(app, body)


def test_new_error_alerts_notify_and_ring_the_bell_unless_silenced(tmp_path):
    """Errors already in the file at start are not news; one appended later is (bell off with --no-bell)."""
    for bell in (True, False):
        path = write_run(tmp_path / f"bell{bell}.jsonl", 50, nan_at={10})
        app = make_app([path], bell=bell, **FAST)
        rings = []
        app.bell = lambda: rings.append(1)

        async def body(pilot):
            await wait_for(pilot, lambda: shown_step(app) == 50, what="step 50")
            assert [n for n in app._notifications if n.severity == "error"] == []
            append(path, json.dumps({"step": 51, "event": "nan_step", "skipped_steps": 2, "loss/total": math.nan}) + "\n")
            await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications), what="notification")
            msg = next(n.message for n in app._notifications if n.severity == "error")
            assert "step 51: ERROR nonfinite" in msg

        run_app(app, body)
        assert rings == ([1] if bell else [])


def test_svg_screenshot_key_and_palette_entries(tmp_path):
    path = write_run(tmp_path / "run" / "metrics.jsonl", 40)
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 40, what="step 40")
        await pilot.press("s")
        await wait_for(pilot, lambda: (path.parent / "npt-monitor-step40.svg").is_file(), what="svg saved")
        assert (path.parent / "npt-monitor-step40.svg").read_text().lstrip().startswith("<svg")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Pause / resume", "Save SVG screenshot", "Cycle zoom", "Toggle log y", "Jump to selected alert"} <= set(titles)

    run_app(app, body)


def test_once_prints_ranks_sparklines_and_alerts(tmp_path, capsys):
    from npt_monitor.cli import main

    recs = [{"step": 0, "event": "start", "run/name": "r", "run/total_steps": 20}]
    for s in range(1, 21):
        slow = s > 8
        recs.append({"step": s, "event": "train", "loss/total": 5.0 - 0.1 * s, "tokens_per_s": 100.0,
                     "time/step_max_s": 0.3 if slow else 0.1, "time/step_median_s": 0.2 if slow else 0.1,
                     "time/slowest_rank": 1, "rank/0/step_s": 0.1, "rank/1/step_s": 0.3 if slow else 0.1,
                     "rank/0/mem_gb": 1.0, "rank/1/mem_gb": 1.5})
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["--once", str(path)]) == 1  # a straggler warning
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("== r  step 20/20")
    assert "ranks: r0 0.1s 1GB  *r1 0.3s 1.5GB   (* slowest)" in out[2]
    spark = next(line for line in out if "loss/total" in line)
    assert "█" in spark and "▁" in spark and spark.strip().endswith("last 3")
    assert out[-1] == "   step 13: WARNING straggler: rank 1 is a straggler: its step 0.3 s = 1.50x the median rank's 0.2 s for 5 log steps"


def test_once_shows_each_ranks_system_figures_with_the_worst_marked(tmp_path, capsys):
    from npt_monitor.cli import main
    from npt_monitor.ranks import rank_rows

    line = {"step": 1, "event": "train", "loss/total": 3.0, "rank/0/step_s": 0.5, "rank/1/step_s": 0.9,
            "rank/0/mem_gb": 2.0, "rank/1/mem_gb": 2.1, "time/slowest_rank": 1,
            "sys/0/gpu_util": 97.0, "sys/0/gpu_mem_gb": 34.2, "sys/0/gpu_power_w": 410.0, "sys/0/gpu_temp_c": 84.0,
            "sys/1/gpu_util": 31.0, "sys/1/gpu_mem_gb": 36.8, "sys/1/gpu_power_w": 180.0, "sys/1/gpu_temp_c": 71.0}
    rows = rank_rows(line)
    assert [(r.rank, r.slowest, sorted(r.worst)) for r in rows] == [
        (0, False, ["gpu_temp_c"]), (1, True, ["gpu_mem_gb", "gpu_power_w", "gpu_util"])]
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert main(["--once", str(path)]) == 0
    assert ("   ranks: r0 0.5s 2GB 97% 34.2GB 410W !84°C  *r1 0.9s 2.1GB !31% !36.8GB !180W 71°C   "
            "(* slowest, ! worst)") in capsys.readouterr().out.splitlines()
    cpu = {"step": 1, "rank/0/step_s": 0.5, "rank/1/step_s": 0.5, "sys/0/cpu_pct": 180.0, "sys/1/cpu_pct": 95.0}
    assert [sorted(r.worst) for r in rank_rows(cpu)] == [[], ["cpu_pct"]]
    assert [sorted(r.worst) for r in rank_rows({**cpu, "sys/1/cpu_pct": 180.0})] == [[], []]  # all alike


def test_smoothing_key_draws_the_ema_over_a_faint_raw_line(tmp_path):
    from npt_monitor.widgets.plot import FAINT, ema, render_plot

    assert ema([1.0, 3.0, 3.0], 0.5) == [1.0, 2.0, 2.5]
    path = write_run(tmp_path / "m.jsonl", 200)
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 200, what="step 200")
        plot = app.query_one(RunView).query_one(".loss-plot", MetricPlot)
        assert plot.smooth == 0.0
        raw, _ = render_plot(plot.state, ("loss/total",), 80, 12)
        assert f"38;5;{FAINT}m" not in raw
        await pilot.press("e")
        await wait_for(pilot, lambda: plot.smooth == 0.3, what="smoothing 0.3")
        smoothed, _ = render_plot(plot.state, ("loss/total",), 80, 12, smooth=0.3)
        assert f"38;5;{FAINT}m" in smoothed and "38;5;12m" in smoothed  # faint raw + the series' colour
        for expected in (0.1, 0.03, 0.0):
            await pilot.press("e")
            await wait_for(pilot, lambda: plot.smooth == expected, what=f"smoothing {expected}")

    run_app(app, body)


def test_x_axis_key_plots_against_wall_time_and_tokens(tmp_path):
    from npt_monitor.widgets.plot import x_mapper

    path = write_run(tmp_path / "m.jsonl", 100)  # synth: 0.8 s and 16384 tokens per step
    app = make_app([path], **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: shown_step(app) == 100, what="step 100")
        state = app.query_one(RunView).run.state
        assert x_mapper(state, "step") is None
        assert x_mapper(state, "time")([1, 51, 100]) == pytest.approx([0.8, 40.8, 80.0], abs=1e-3)  # since step 0
        assert x_mapper(state, "tokens")([10, 100]) == [163840.0, 1638400.0]
        plot = app.query_one(RunView).query_one(".loss-plot", MetricPlot)
        for expected in ("time", "tokens", "step"):
            await pilot.press("x")
            await wait_for(pilot, lambda: plot.x_axis == expected, what=f"x axis {expected}")

    run_app(app, body)


def test_overlay_key_draws_every_run_in_its_fixed_colour(tmp_path):
    from npt_monitor.widgets.plot import PALETTE, OverlayPlot, render_plot

    paths = [write_run(tmp_path / f"r{i}.jsonl", 60, seed=i) for i in range(3)]
    app = make_app(paths, **FAST)

    async def body(pilot):
        await wait_for(pilot, lambda: all(shown_step(app, i) == 60 for i in range(3)), what="three runs")
        overlay = app.query_one(OverlayPlot)
        assert not overlay.display
        await pilot.press("o")
        await wait_for(pilot, lambda: overlay.display and not app.query_one("#runs").display, what="overlay shown")
        text, legend = render_plot(overlay.runs[0][1], ("loss/total",), 80, 12, overlay=overlay.runs)
        assert [c for _, c, _ in legend] == list(PALETTE[:3])
        assert all(f"38;5;{c}m" in text for c in PALETTE[:3])
        await pilot.press("o")
        await wait_for(pilot, lambda: not overlay.display, what="side by side again")

    run_app(app, body, size=(160, 44))


def test_a_silent_run_raises_a_stall_error_with_the_bell_and_a_new_line_rearms_it(tmp_path):
    """Live: no line for longer than the bound (--stall-s 2 here; the file and its lines 100 s old) is an error
    alert, announced with the bell; lines written again end the silence, and the next silence is flagged again."""
    import os

    now = time.time()
    path = tmp_path / "metrics.jsonl"
    recs = [{"time": now - 130 + s, "step": s, "event": "train", "loss/total": 3.0} for s in range(1, 31)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    os.utime(path, (now - 100, now - 100))
    app = make_app([path], stall_s=2.0, **FAST)
    bells = []
    app.bell = lambda: bells.append(time.monotonic())

    def stalls():
        return [a for a in panel(app).alerts if a.kind == "stall"]

    async def body(pilot):
        await wait_for(pilot, lambda: len(stalls()) == 1, timeout=5, what="a stall alert")
        alert = stalls()[0]
        assert (alert.step, alert.severity) == (30, "error") and len(bells) == 1
        assert alert.message.startswith("no line for 1m") and alert.message.endswith(
            "(bound 2s): last step 30, last event train")
        append(path, json.dumps({"time": time.time(), "step": 31, "event": "train", "loss/total": 3.0}) + "\n")
        await wait_for(pilot, lambda: shown_step(app) == 31, what="step 31")
        assert not app.query_one(RunView).run.stalled
        await wait_for(pilot, lambda: len(stalls()) == 2, timeout=6, what="the next silence")
        assert stalls()[1].step == 31 and len(bells) == 2

    run_app(app, body)
