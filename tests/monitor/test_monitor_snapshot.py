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

from npt_monitor.app import make_app
from npt_monitor.synth import synth_lines
from npt_monitor.widgets import MetricPlot, RunHeader, RunView

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


def with_ranks(lines: list[str], slow_rank: int, from_step: int) -> list[str]:
    """Add the trainer's per-rank keys (npt_ds.metrics.rank_stats, npt_ds.metrics.system) to the train lines:
    4 ranks, one slowed (its GPU idles: the lowest utilisation and power), rank 3 the fullest and hottest."""
    import json

    out = []
    for line in lines:
        rec = json.loads(line)
        if rec.get("event") == "train":
            own = [0.50, 0.52, 0.51, 0.49]
            if rec["step"] >= from_step:
                own[slow_rank] = 0.95
            mem = [2.10, 2.12, 2.11, 2.30]
            slowest = own.index(max(own))
            rec.update({"time/step_s": max(own) + 0.01, "time/step_max_s": max(own), "time/step_min_s": min(own),
                        "time/step_median_s": sorted(own)[1:3][0] / 2 + sorted(own)[1:3][1] / 2,
                        "time/slowest_rank": slowest, "mem/peak_alloc_gb": max(mem), "mem/peak_rank": 3,
                        "perf/tflops_per_device": 412.0, "perf/mfu": 0.4166})
            rec.update({f"rank/{r}/step_s": own[r] for r in range(4)})
            rec.update({f"rank/{r}/mem_gb": mem[r] for r in range(4)})
            slow = rec["step"] >= from_step
            for r in range(4):
                idle = slow and r == slow_rank
                rec.update({f"sys/{r}/gpu_util": 31.0 if idle else 97.0 - r, f"sys/{r}/gpu_mem_gb": 34.1 + mem[r] - 2.1,
                            f"sys/{r}/gpu_power_w": 180.0 if idle else 410.0 + r, f"sys/{r}/gpu_temp_c": 70.0 + 4 * r})
        out.append(json.dumps(rec))
    return out


def test_ranks_panel_with_a_straggler(snap_compare, tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(with_ranks(synth_lines(300, run_name="four-ranks", total_steps=600), 2, 250)) + "\n")
    app = make_app([path.parent], **FAST)
    assert snap_compare(app, terminal_size=(140, 44), run_before=loaded([300]))


def test_smoothed_plots(snap_compare, tmp_path):
    path = write_run(tmp_path / "run" / "metrics.jsonl", 400, run_name="smoothed", total_steps=400, noise=0.08)
    app = make_app([path.parent], **FAST)
    assert snap_compare(app, terminal_size=(120, 40), run_before=loaded([400]), press=["e", "e", "_"])


def test_three_runs_overlaid(snap_compare, tmp_path):
    paths = [write_run(tmp_path / name / "metrics.jsonl", 300, run_name=name, total_steps=300, seed=i)
             for i, name in enumerate(("lr-1e-3", "lr-3e-3", "lr-1e-2"))]
    app = make_app(paths, **FAST)
    assert snap_compare(app, terminal_size=(140, 40), run_before=loaded([300, 300, 300]), press=["o", "_"])
