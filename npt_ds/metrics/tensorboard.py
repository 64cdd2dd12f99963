"""TensorBoard for the metric stream: the same scalars as ``metrics.jsonl``, in ``RUN_DIR/tb``.

* ``logging.tensorboard: true``: :class:`TensorBoardSink` behind :class:`npt_ds.metrics.writer.MetricsWriter`
  (like wandb) writes each line's numbers as it is logged;
* ``npt-ds tb RUN_DIR [--out DIR]`` converts an existing ``metrics.jsonl`` (:func:`convert`).

Every numeric key of a line (bools, text and ``step``/``time`` aside) is one scalar, tagged with its key,
at the line's ``step`` and wall time ``time``; values are stored in double precision, so they read back
exactly.  The ``tensorboard`` package is an optional dependency (``pip install 'npt-ds[tensorboard]'``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Iterable

from ..config import ConfigError

INSTALL = "pip install 'tensorboard==2.21.0'"
SKIP = frozenset({"step", "time"})


def require_tensorboard(what: str = "logging.tensorboard: true") -> None:
    """Raise :class:`ConfigError` (one line, naming the install) if the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"{what} needs the tensorboard package, which is not installed: {INSTALL}")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The line's numbers by key (what TensorBoard gets)."""
    return {k: float(v) for k, v in record.items()
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars of each logged line into ``log_dir`` (one event file per writer)."""

    def __init__(self, log_dir: str | Path) -> None:
        require_tensorboard()
        # lazy: the optional tensorboard package, and about a second of imports only runs that asked for it
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None
        wall = record.get("time") if isinstance(record.get("time"), (int, float)) else None
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall, new_style=True,
                                   double_precision=True)

    def close(self) -> None:
        self.writer.close()


def convert(records: Iterable[dict[str, Any]], log_dir: str | Path) -> tuple[int, int]:
    """Write ``records`` (a stream's lines) to ``log_dir``; returns (lines, scalars) written."""
    sink = TensorBoardSink(log_dir)
    lines = values = 0
    try:
        for rec in records:
            sink.log(rec)
            lines += 1
            values += len(scalars(rec))
    finally:
        sink.close()
    return lines, values


def read_lines(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The JSON objects of ``path`` and the numbers of the lines that are not one (a half-written last line)."""
    records, bad = [], []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(n)
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad.append(n)
    return records, bad


def add_tb_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (its metrics.jsonl) or a metrics .jsonl file")
    parser.add_argument("--out", default=None, help="event file directory (default: RUN_DIR/tb); must hold no "
                                                    "event files yet")


def run_tb(args: argparse.Namespace) -> int:
    src = Path(args.run_dir)
    path = src / "metrics.jsonl" if src.is_dir() else src
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (give a run directory with a metrics.jsonl)")
    out = Path(args.out) if args.out else path.parent / "tb"
    if out.is_dir() and any(out.glob("events.out.tfevents.*")):
        raise ValueError(f"{out} already holds TensorBoard event files (a second copy would show every curve "
                         "twice); pass --out NEW_DIR (nothing was written)")
    require_tensorboard("the conversion")
    records, bad = read_lines(path)
    lines, values = convert(records, out)
    for n in bad[:5]:
        print(f"npt-ds tb: warning: {path}:{n}: not a JSON object, skipped", file=sys.stderr)
    if len(bad) > 5:
        print(f"npt-ds tb: warning: ... {len(bad) - 5} more lines skipped", file=sys.stderr)
    print(f"{out}: {values} scalars from {lines} lines of {path} (tensorboard --logdir {out})")
    return 0
