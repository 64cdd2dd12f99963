"""npt-monitor SVG snapshots (pytest-textual-snapshot) at fixed terminal sizes.

Deterministic: data come from seeded synthetic runs, the run name from the
start line (not the tmp path), nothing renders wall-clock time, and every
screenshot is taken after the whole file is loaded and shown.
Regenerate with ``pytest tests/test_monitor_snapshot.py --snapshot-update``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from monitor.app import make_app
from monitor.synth import synth_lines
from monitor.widgets import MetricPlot, RunHeader, RunView

pytestmark = pytest.mark.timeout(120)

FAST = dict(poll_interval=0.03, refresh_interval=0.03)


def write_run(path: Path, n: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(synth_lines(n, **kw)) + "\n")
    return path


def loaded(steps: list[int]):
    async def run_before(pilot) -> None:
        app = pilot.app
        deadline = time.monotonic() + 20

        def done() -> bool:
            views = list(app.query(RunView))
            return len(views) == len(steps) and all(
                v.query_one(RunHeader).info.step == s
                and all(p.version == v.run.state.version for p in v.query(MetricPlot))
                for v, s in zip(views, steps)
            )

        while not done():
            assert time.monotonic() < deadline, "app did not load the fixture"
            await pilot.pause(0.05)
        await pilot.pause()

    return run_before


def test_single_run_with_alerts(snap_compare, tmp_path):
    path = write_run(
        tmp_path / "run" / "metrics.jsonl",
        600,
        run_name="smol-npt-a",
        total_steps=2000,
        nan_at={150},
        kl_at={300: 9.4},
        oscillate=(420, 480),
        eval_every=200,
    )
    app = make_app([path.parent], **FAST)
    assert snap_compare(app, terminal_size=(120, 40), run_before=loaded([600]))


def test_two_runs_jumped_to_alert(snap_compare, tmp_path):
    a = write_run(tmp_path / "a" / "metrics.jsonl", 500, run_name="baseline", total_steps=1000, seed=1)
    b = write_run(
        tmp_path / "b" / "metrics.jsonl", 500, run_name="hot-lr", total_steps=1000, seed=2, kl_at={250: 9.4}
    )
    app = make_app([a, b], **FAST)
    assert snap_compare(app, terminal_size=(160, 44), run_before=loaded([500, 500]), press=["j", "_"])
