"""The one metrics path: rank 0 appends flat JSON lines to RUN_DIR/metrics.jsonl; wandb and TensorBoard
(RUN_DIR/tb, :mod:`npt_ds.metrics.tensorboard`) are optional sinks.

Values are plain floats/ints/strings (call `.item()` only on log steps, before handing them here).
Non-finite floats are written as JSON's NaN/Infinity tokens, which Python and npt-monitor read.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .tensorboard import TensorBoardSink


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True, wandb_cfg: dict | None = None,
                 console: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = console and enabled
        self._file = None
        self._wandb = None
        self._tb: TensorBoardSink | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
            if wandb_cfg:
                self._wandb = _start_wandb(wandb_cfg, run_dir)
            if tensorboard:
                self._tb = TensorBoardSink(Path(run_dir) / "tb")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        if self._wandb is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self._wandb.log(numeric, step=int(record.get("step", 0)))
        if self._tb is not None:
            self._tb.log(record)

    def progress(self, step: int, total: int, loss: float, tokens_per_s: float, eta_s: float, extra: str = "") -> None:
        if not self.console:
            return
        tty = sys.stdout.isatty()
        if not tty and step % max(1, total // 20) and step < total:
            return  # in a log file: about 20 progress lines per run
        bar = int(30 * step / max(total, 1))
        eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
        line = (f"step {step:>6}/{total} [{'#' * bar}{'.' * (30 - bar)}] loss {loss:.4g} "
                f"{tokens_per_s:,.0f} tok/s ETA {eta} {extra}")
        sys.stdout.write(f"\r{line}   " if tty else line + "\n")
        if tty and step >= total:
            sys.stdout.write("\n")
        sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.console:
            print(("\n" if sys.stdout.isatty() else "") + text, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(value: Any):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _start_wandb(cfg: dict, run_dir) -> Any:
    try:
        import wandb  # lazy: an optional sink (logging.wandb) whose import takes seconds
    except ImportError:  # pragma: no cover - wandb is a declared dependency
        raise RuntimeError("logging.wandb is true but wandb is not installed; pip install wandb") from None
    return wandb.init(project=cfg.get("project", "npt-ds"), name=cfg.get("name"), dir=str(run_dir),
                      config=cfg.get("config"), reinit=True)


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl (tests, tools). Corrupt lines raise with their line number."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
    return out
