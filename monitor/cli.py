"""``npt-monitor`` command line.

    npt-monitor RUN_DIR_OR_METRICS.jsonl [MORE ...]     live dashboard (side by side)
    npt-monitor --check METRICS.jsonl [MORE ...]        headless: print alerts

``--check`` prints one alert per line (``step N: SEVERITY kind: message``,
prefixed with the file when several are given) on stdout, corrupt lines as
warnings with their line number on stderr, and exits 1 if any alert fired,
2 if a file is missing, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .alerts import AlertConfig
from .stream import metrics_path

MAX_CORRUPT_SHOWN = 20


def build_parser() -> argparse.ArgumentParser:
    d = AlertConfig()
    ap = argparse.ArgumentParser(
        prog="npt-monitor",
        description="Live terminal dashboard (or headless check) for npt-ds metric streams.",
    )
    ap.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_METRICS.jsonl", help="RUN_DIR means RUN_DIR/metrics.jsonl")
    ap.add_argument("--check", action="store_true", help="headless: print alerts, exit 1 if any fired")
    g = ap.add_argument_group("alert thresholds")
    g.add_argument("--kl-threshold", type=float, default=d.kl_threshold, help="kd/kl above this alerts (%(default)s)")
    g.add_argument("--grad-spike-factor", type=float, default=d.grad_spike_factor, help="x rolling median (%(default)s)")
    g.add_argument("--grad-spike-window", type=int, default=d.grad_spike_window, help="median window (%(default)s)")
    g.add_argument("--osc-window", type=int, default=d.osc_window, help="oscillation window, steps (%(default)s)")
    g.add_argument(
        "--osc-min-reversals", type=int, default=d.osc_min_reversals, help="reversals in window to alert (%(default)s)"
    )
    g.add_argument(
        "--osc-rel-amplitude", type=float, default=d.osc_rel_amplitude, help="min reversal, fraction of loss (%(default)s)"
    )
    g.add_argument("--osc-ema-alpha", type=float, default=d.osc_ema_alpha, help="loss EMA factor (%(default)s)")
    g.add_argument("--plateau-window", type=int, default=d.plateau_window, help="not-decreasing window (%(default)s)")
    g.add_argument(
        "--plateau-min-rel-decrease",
        type=float,
        default=d.plateau_min_rel_decrease,
        help="required relative decrease between the window halves (%(default)s)",
    )
    ui = ap.add_argument_group("dashboard")
    ui.add_argument("--poll-interval", type=float, default=0.2, help="seconds between file polls (%(default)s)")
    return ap


def config_from_args(args: argparse.Namespace) -> AlertConfig:
    return AlertConfig(
        kl_threshold=args.kl_threshold,
        grad_spike_factor=args.grad_spike_factor,
        grad_spike_window=args.grad_spike_window,
        osc_window=args.osc_window,
        osc_min_reversals=args.osc_min_reversals,
        osc_rel_amplitude=args.osc_rel_amplitude,
        osc_ema_alpha=args.osc_ema_alpha,
        plateau_window=args.plateau_window,
        plateau_min_rel_decrease=args.plateau_min_rel_decrease,
    )


def run_check(paths: Sequence[Path], config: AlertConfig, out=None, err=None) -> int:
    """Headless check of complete files; returns the exit status."""
    from .run import check_file

    out = out or sys.stdout
    err = err or sys.stderr
    status = 0
    several = len(paths) > 1
    for path in paths:
        try:
            run, corrupt = check_file(path, config)
        except FileNotFoundError:
            print(f"npt-monitor: error: {path}: no such file", file=err)
            status = max(status, 2)
            continue
        for bad in corrupt[:MAX_CORRUPT_SHOWN]:
            print(f"warning: {path}:{bad.line_no}: corrupt line ignored: {bad.reason}", file=err)
        total_bad = run.state.corrupt_count
        if total_bad > MAX_CORRUPT_SHOWN:
            print(f"warning: {path}: ... {total_bad - MAX_CORRUPT_SHOWN} more corrupt lines", file=err)
        prefix = f"{path}: " if several else ""
        for alert in run.alerts:
            print(prefix + alert.format(), file=out)
        if run.dropped_alerts:
            print(f"{prefix}... {run.dropped_alerts} more alerts not shown", file=out)
        n_alerts = len(run.alerts) + run.dropped_alerts
        print(
            f"{path}: {run.state.n_records} records, last step {run.state.step}, "
            f"{n_alerts} alert{'s' if n_alerts != 1 else ''}, {total_bad} corrupt line{'s' if total_bad != 1 else ''}",
            file=err,
        )
        if n_alerts:
            status = max(status, 1)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    paths = [metrics_path(p) for p in args.paths]
    if args.check:
        return run_check(paths, config)
    from .app import make_app

    app = make_app(paths, config, poll_interval=args.poll_interval)
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
