"""npt-monitor --check (headless) and argument handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from npt_monitor.cli import build_parser, config_from_args, main
from npt_monitor.synth import synth_lines

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, lines: list[str], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def test_check_clean_run_exits_zero(tmp_path, capsys):
    path = write(tmp_path / "run" / "metrics.jsonl", synth_lines(800, eval_every=100))
    assert main(["--check", str(tmp_path / "run")]) == 0  # RUN_DIR form; start + 800 steps + 8 evals
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: 809 records, last step 800, 0 alerts (0 warning/error), 0 corrupt lines" in err


def test_check_prints_alerts_with_steps_and_exits_one(tmp_path, capsys):
    path = write(tmp_path / "m.jsonl", synth_lines(300, nan_at={40}, kl_at={120: 9.4}))
    assert main(["--check", str(path)]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        "step 40: ERROR nonfinite: non-finite loss/total=NaN",
        "step 40: ERROR skipped: step skipped (nan_step event, skipped_steps=1)",
        "step 120: ERROR kl_high: KL 9.4 > 8",
    ]


def test_check_threshold_flags(tmp_path, capsys):
    path = write(tmp_path / "m.jsonl", synth_lines(300, kl_at={120: 9.4}))
    assert main(["--check", "--kl-threshold", "10", str(path)]) == 0
    assert main(["--check", "--kl-threshold", "9", str(path)]) == 1


def test_check_corrupt_lines_are_warnings_not_failures(tmp_path, capsys):
    lines = synth_lines(50)
    lines[10] = '{"step": 10, "loss/total": 1.2'  # cut short
    lines[20] = "[]"
    path = write(tmp_path / "m.jsonl", lines, tail='{"step": 51, "lo')
    assert main(["--check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert warnings == [
        f"warning: {path}:11: corrupt line ignored: not JSON (Expecting ',' delimiter)",
        f"warning: {path}:21: corrupt line ignored: not a JSON object (list)",
        f"warning: {path}:52: corrupt line ignored: incomplete last line (no newline)",
    ]
    assert "3 corrupt lines" in err


def test_check_missing_file_exits_two(tmp_path, capsys):
    assert main(["--check", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_check_several_files_prefixes_alerts(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", synth_lines(200))
    b = write(tmp_path / "b.jsonl", synth_lines(200, kl_at={50: 12.0}))
    assert main(["--check", str(a), str(b)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{b}: step 50: ERROR kl_high: KL 12 > 8"]


def test_parser_maps_flags_to_config():
    args = build_parser().parse_args(["--osc-window", "30", "--osc-power-ratio", "60", "--plateau-window", "80",
                                      "--straggler-factor", "1.5", "--grad-clip", "1", "x"])
    cfg = config_from_args(args)
    assert (cfg.osc_window, cfg.osc_power_ratio, cfg.plateau_window, cfg.kl_threshold) == (30, 60.0, 80, 8.0)
    assert (cfg.straggler_factor, cfg.grad_clip, cfg.throughput_factor) == (1.5, 1.0, 0.7)


@pytest.mark.timeout(60)
def test_module_entry_point_check(tmp_path):
    path = write(tmp_path / "m.jsonl", synth_lines(100, kl_at={7: 9.4}))
    proc = subprocess.run(
        [sys.executable, "-m", "npt_monitor", "--check", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == "step 7: ERROR kl_high: KL 9.4 > 8\n"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, reader", [("--once", "head -1"), ("--check", "head -1"), ("--check", "grep -q ERROR")])
def test_a_reader_that_stops_early_ends_the_output_quietly(tmp_path, mode, reader):
    """`npt-monitor --once RUN | head -1`: a real pipe whose reader leaves after one line, with far more output
    than the pipe holds (64 KiB): no traceback, and the exit status is still the alerts' (1)."""
    path = write(tmp_path / "m.jsonl", synth_lines(3000, n_layers=0, nan_at=set(range(10, 2990, 2))))
    script = f'"$0" -m npt_monitor {mode} "$1" | {reader}; echo "status ${{PIPESTATUS[0]}}" >&2'
    proc = subprocess.run(["bash", "-c", script, sys.executable, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == "status 1"
    if reader == "head -1":
        first = "== npt-demo  step 3000/3000" if mode == "--once" else "step 10: ERROR nonfinite: non-finite"
        assert proc.stdout.startswith(first) and proc.stdout.count("\n") == 1
