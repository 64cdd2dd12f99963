"""How a launch attempt ended, read from the run's metric stream (for launch/*.sh and the Slurm script).

    python -m npt_ds.train.outcome CONFIG [key.path=value ...] --since EPOCH_S [--wait S]

Prints the run-ending event logged at or after EPOCH_S (``preempted``, ``stop``, ``end``, ``abort``, or ``none``),
waiting up to S seconds for one to appear: when a launcher is signalled, DeepSpeed's runners may return before the
ranks have finished their checkpoint.  Exit 0 when the job ended on purpose (``preempted``, ``stop``, ``end``: do
not relaunch), 1 otherwise, 2 on a bad config.  A preempted job must end the launch script with 0, although
DeepSpeed's per-node launcher exits 1 after forwarding a SIGTERM to ranks that all saved and exited 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import ConfigError, load_config

ENDINGS = ("preempted", "stop", "end", "abort")
ON_PURPOSE = ("preempted", "stop", "end")


def last_ending(metrics: Path, since: float) -> str | None:
    """The last run-ending event in `metrics` whose `time` is at or after `since` (lines cut by a kill skipped)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return None
    found = None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("event") in ENDINGS and float(row.get("time", 0)) >= since:
            found = row["event"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npt_ds.train.outcome", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--since", type=float, required=True, help="epoch seconds the attempt started")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for an ending event")
    args = parser.parse_args(argv)
    try:
        run_dir = Path(load_config(args.config, args.overrides).logging.run_dir)
    except ConfigError as exc:
        print(f"npt-ds outcome: {exc}", file=sys.stderr)
        return 2
    deadline = time.time() + args.wait
    while (event := last_ending(run_dir / "metrics.jsonl", args.since)) is None and time.time() < deadline:
        time.sleep(0.5)
    print(event or "none")
    return 0 if event in ON_PURPOSE else 1


if __name__ == "__main__":
    sys.exit(main())
