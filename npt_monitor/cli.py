"""``npt-monitor`` command line.

    npt-monitor RUN_DIR_OR_METRICS.jsonl [MORE ...]     live dashboard (side by side)
    npt-monitor --check METRICS.jsonl [MORE ...]        headless: print alerts
    npt-monitor --once RUN_DIR [MORE ...]               the dashboard as text (sparklines, ranks, alerts)

``--check`` prints one alert per line (``step N: SEVERITY kind: message``,
prefixed with the file when several are given) on stdout, corrupt lines as
warnings with their line number on stderr, and exits 1 if a warning or error
alert fired (``info`` notes do not count), 2 if a file is missing, 0 otherwise.
``--stall`` adds whether the run is stalled now (silent for longer than its bound, no end event).
Output piped into a reader that stops early (``| head -1``, ``| grep -q``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from .alerts import FAILING, AlertConfig
from .once import render_once
from .parsing import metrics_path
from .run import check_file

MAX_CORRUPT_SHOWN = 20


def build_parser() -> argparse.ArgumentParser:
    d = AlertConfig()
    ap = argparse.ArgumentParser(
        prog="npt-monitor",
        description="Live terminal dashboard (or headless check) for npt-ds metric streams.",
    )
    ap.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_METRICS.jsonl", help="RUN_DIR means RUN_DIR/metrics.jsonl")
    ap.add_argument("--check", action="store_true", help="headless: print alerts, exit 1 if a warning/error fired")
    ap.add_argument("--once", action="store_true",
                    help="print the dashboard as text (header, ranks, sparklines, alerts) and exit as --check does")
    ap.add_argument("--stall", action="store_true",
                    help="with --check/--once: also report a run that is stalled now (silent for longer than its "
                         "bound, counted from the later of its last line's time and the file's modification time, "
                         "and no end event): a cron job can page on exit 1")
    ap.add_argument("--no-bell", action="store_true", help="dashboard: no terminal bell on new error alerts")
    g = ap.add_argument_group("alert thresholds (every number of npt_monitor.alerts.AlertConfig; see docs/alerts.md)")
    for name, kind in threshold_fields():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name), metavar="N",
                       help="(%(default)s)")
    ui = ap.add_argument_group("dashboard")
    ui.add_argument("--poll-interval", type=float, default=0.2, help="seconds between file polls (%(default)s)")
    return ap


def threshold_fields() -> list[tuple[str, type]]:
    """(name, float | int) of every numeric AlertConfig field: each one is a flag."""
    out = []
    for f in fields(AlertConfig):
        kind = {"float": float, "int": int, "float | None": float}.get(str(f.type))
        if kind is not None:
            out.append((f.name, kind))
    return out


def config_from_args(args: argparse.Namespace) -> AlertConfig:
    return AlertConfig(**{name: getattr(args, name) for name, _ in threshold_fields()})


class PipeSafe:
    """A text stream whose reader may stop early (``| head -1``): after a broken pipe its writes go to
    /dev/null (so neither a later print nor the flush at exit raises), and the exit status stays meaningful."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def _each_run(paths: Sequence[Path], config: AlertConfig, err, show, stall: bool = False) -> int:
    """show(path, run, corrupt lines) for each file; a missing one is reported on `err`.  The exit status:
    2 if a file was missing, else 1 if a run has a warning/error alert, else 0."""
    status = 0
    for path in paths:
        try:
            run, corrupt = check_file(path, config, stall=stall)
        except FileNotFoundError:
            print(f"npt-monitor: error: {path}: no such file", file=err)
            status = 2
            continue
        show(path, run, corrupt)
        if run.dropped_alerts or any(a.severity in FAILING for a in run.alerts):
            status = max(status, 1)
    return status


def run_check(paths: Sequence[Path], config: AlertConfig, out=None, err=None, stall: bool = False) -> int:
    """Headless check of complete files; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    several = len(paths) > 1

    def show(path, run, corrupt) -> None:
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
        failing = sum(a.severity in FAILING for a in run.alerts) + run.dropped_alerts
        print(
            f"{path}: {run.state.n_records} records, last step {run.state.step}, "
            f"{n_alerts} alert{'s' if n_alerts != 1 else ''} ({failing} warning/error), "
            f"{total_bad} corrupt line{'s' if total_bad != 1 else ''}",
            file=err,
        )

    return _each_run(paths, config, err, show, stall)


def run_once(paths: Sequence[Path], config: AlertConfig, out=None, err=None, stall: bool = False) -> int:
    """``--once``: each run's text dashboard; the exit status of ``--check``."""
    out = out or sys.stdout
    return _each_run(paths, config, err or sys.stderr, lambda path, run, corrupt: print(render_once(run), file=out),
                     stall)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    paths = [metrics_path(p) for p in args.paths]
    if args.check or args.once:
        out, err = PipeSafe(sys.stdout), PipeSafe(sys.stderr)
        status = (run_check if args.check else run_once)(paths, config, out, err, args.stall)
        out.flush()
        err.flush()
        return status
    from .app import make_app  # lazy: Textual (~0.5 s) only for the live dashboard, not --check / --once

    app = make_app(paths, config, poll_interval=args.poll_interval, bell=not args.no_bell)
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
