"""npt-monitor's stall alert: a run's silence against its own bound (alerts/stall.py), once per silence in a
Run, and ``--check --stall`` on real files whose modification time is set."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from npt_monitor.alerts import AlertConfig, stall_alert, stall_bound
from npt_monitor.cli import main
from npt_monitor.parsing import Batch
from npt_monitor.run import Run
from npt_monitor.state import RunState

T0 = 1_700_000_000.0


def train(n: int, gap: float = 1.0, t0: float = T0) -> list[dict]:
    """A start line at t0 and n train lines `gap` seconds apart."""
    return [{"time": t0, "step": 0, "event": "start"}] + [
        {"time": t0 + gap * s, "step": s, "event": "train", "loss/total": 3.0} for s in range(1, n + 1)]


def state_of(records: list[dict]) -> RunState:
    state = RunState()
    state.ingest(Batch.from_dicts(records))
    return state


def test_the_bound_is_the_runs_own():
    cfg = AlertConfig()
    assert stall_bound(cfg, state_of(train(30, gap=1.0))) == 60.0  # max(60 s, 20 x the median 1 s)
    assert stall_bound(cfg, state_of(train(30, gap=10.0))) == 200.0
    assert stall_bound(cfg, state_of(train(0))) == 600.0  # before the first train line
    assert stall_bound(AlertConfig(stall_s=5.0), state_of(train(30))) == 5.0
    assert stall_bound(AlertConfig(stall_s=5.0), state_of(train(0))) == 5.0


def test_silence_beyond_the_bound_is_a_stall_error_naming_step_event_and_phase():
    cfg, last = AlertConfig(), T0 + 30
    state = state_of(train(30))
    assert stall_alert(cfg, state, now=last + 60, mtime=None) is None
    alert = stall_alert(cfg, state, now=last + 61, mtime=None)
    assert (alert.step, alert.kind, alert.severity) == (30, "stall", "error")
    assert alert.message == "no line for 1m01s (bound 1m00s): last step 30, last event train"
    assert alert.line_no == 31
    # counted from the later of the last line's time and the file's modification time
    assert stall_alert(cfg, state, now=last + 61, mtime=last + 30) is None
    assert stall_alert(cfg, state, now=last + 61, mtime=last - 30) is not None
    # eval and checkpoint lines are lines
    evaluated = state_of(train(30) + [{"time": last + 40, "step": 30, "event": "eval"}])
    assert stall_alert(cfg, evaluated, now=last + 61, mtime=None) is None
    phase = state_of(train(30)[:-1] + [{**train(30)[-1], "phase": "optimizer"}])
    assert stall_alert(cfg, phase, now=last + 61, mtime=None).message.endswith("last event train (optimizer)")


def test_before_the_first_train_line_the_bound_is_longer():
    state = state_of(train(0))
    assert stall_alert(AlertConfig(), state, now=T0 + 600, mtime=None) is None
    assert stall_alert(AlertConfig(), state, now=T0 + 601, mtime=None).message == (
        "no line for 10m01s (bound 10m00s, before the first train line): last step 0, last event start")
    assert stall_alert(AlertConfig(stall_startup_s=30), state, now=T0 + 31, mtime=None) is not None


@pytest.mark.parametrize("event", ["end", "stop", "abort", "preempted"])
def test_a_run_that_ended_is_not_stalled_until_it_starts_again(event):
    ended = train(30) + [{"time": T0 + 31, "step": 30, "event": event}]
    assert stall_alert(AlertConfig(), state_of(ended), now=T0 + 10_000, mtime=None) is None
    resumed = ended + [{"time": T0 + 40, "step": 30, "event": "start"}]
    assert stall_alert(AlertConfig(), state_of(resumed), now=T0 + 10_000, mtime=None) is not None


def test_a_run_raises_one_stall_per_silence():
    run = Run("unused.jsonl")
    run.exists = True
    run.ingest(Batch.from_dicts(train(30)))
    first = run.check_stall(T0 + 100, None)
    assert first is not None and run.alerts == [first]
    assert run.check_stall(T0 + 200, None) is None  # still the same silence
    run.ingest(Batch.from_dicts([{"time": T0 + 210, "step": 31, "event": "train", "loss/total": 3.0}],
                                first_line_no=32))
    assert run.check_stall(T0 + 250, None) is None
    second = run.check_stall(T0 + 300, None)
    assert second is not None and second.step == 31 and len(run.alerts) == 2


def write_aged(path: Path, records: list[dict], age_s: float) -> Path:
    """Write `records` and set the file's modification time `age_s` seconds back."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_check_stall_reports_a_silent_run_and_exits_1(tmp_path, capsys):
    now = time.time()
    silent = write_aged(tmp_path / "silent.jsonl", train(30, t0=now - 1000), age_s=970)
    assert main(["--check", str(silent)]) == 0  # without --stall: the stream's content only
    capsys.readouterr()
    assert main(["--check", "--stall", str(silent)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("step 30: ERROR stall: no line for 16m")
    assert out[0].endswith("(bound 1m00s): last step 30, last event train")
    ended = write_aged(tmp_path / "ended.jsonl", train(30, t0=now - 1000) + [{"time": now - 969, "step": 30,
                                                                              "event": "end"}], age_s=969)
    fresh = write_aged(tmp_path / "fresh.jsonl", train(30, t0=now - 1000), age_s=0)
    assert main(["--check", "--stall", str(ended), str(fresh)]) == 0
    assert main(["--check", "--stall", "--stall-s", "2000", str(silent)]) == 0
    assert main(["--once", "--stall", str(silent)]) == 1
    assert "ERROR stall: no line for" in capsys.readouterr().out
