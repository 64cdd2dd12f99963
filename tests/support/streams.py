"""Reading a live run's metric stream from a test."""
from __future__ import annotations

import json
from pathlib import Path


def last_logged_step(run_dir: Path) -> int:
    """The newest train step of a live run's stream (a half-written last line is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("event") == "train":
            steps.append(row["step"])
    return max(steps)
