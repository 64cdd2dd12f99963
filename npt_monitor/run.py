"""One monitored run: a RunState plus its AlertEngine and the alerts it raised.

Pure (no Textual); the app keeps one :class:`Run` per file, ``--check`` builds
one with :func:`check_file`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .alerts import Alert, AlertConfig, AlertEngine, stall_alert
from .parsing import Batch, CorruptLine, parse_lines
from .state import RunState
from .tailer import FileTailer, TailBatch

__all__ = ["Run", "check_file"]


class Run:
    def __init__(
        self,
        path: str | Path,
        config: AlertConfig | None = None,
        max_points: int = 20_000,
        max_alerts: int = 5_000,
    ) -> None:
        self.path = Path(path)
        self.state = RunState(self.path, max_points=max_points)
        self.engine = AlertEngine(config)
        self.max_alerts = max_alerts
        self.alerts: list[Alert] = []
        self.dropped_alerts = 0
        self.exists = False
        self.resets = 0
        self.last_reset_reason = ""
        self.stalled = False  # a stall alert is up (until the next line)

    def reset(self, reason: str = "") -> None:
        self.state.reset()
        self.engine.reset()
        self.alerts.clear()
        self.dropped_alerts = 0
        self.stalled = False
        self.resets += 1
        self.last_reset_reason = reason

    def ingest(self, batch: Batch, corrupt: list[CorruptLine] = ()) -> list[Alert]:
        """Fold a batch (and count corrupt lines); return the new alerts."""
        batch.prepare(self.state.step)
        if len(batch):
            self.stalled = False  # the run wrote again
        self.state.ingest(batch)
        new = self.engine.feed(batch)
        for bad in corrupt:
            self.state.note_corrupt(bad)
        if new:
            self._keep(new)
        return new

    def check_stall(self, now: float, mtime: float | None) -> Alert | None:
        """A new ``stall`` alert if the run has been silent for longer than its bound at ``now`` (once per silence)."""
        if self.stalled or not self.exists:
            return None
        alert = stall_alert(self.engine.config, self.state, now, mtime)
        if alert is not None:
            self.stalled = True
            self._keep([alert])
            self.state.version += 1  # the widgets show it at their next refresh
        return alert

    def _keep(self, new: list[Alert]) -> None:
        room = max(0, self.max_alerts - len(self.alerts))
        self.dropped_alerts += max(0, len(new) - room)
        self.alerts.extend(new[:room])

    def apply(self, batch: TailBatch) -> list[Alert]:
        self.exists = batch.exists
        if batch.reset:
            self.reset(batch.reason)
        return self.ingest(batch.batch, batch.corrupt)

    def ingest_lines(self, lines: list[bytes | str], first_line_no: int = 1) -> list[Alert]:
        batch, corrupt = parse_lines(lines, first_line_no)
        return self.ingest(batch, corrupt)


def check_file(
    path: str | Path, config: AlertConfig | None = None, keep_corrupt: int = 1000, stall: bool = False
) -> tuple[Run, list[CorruptLine]]:
    """Read a whole file once (headless).

    Returns the run and up to ``keep_corrupt`` corrupt lines (an unterminated,
    unparsable last line included); ``run.state.corrupt_count`` has the total.
    ``stall``: also judge whether the run is stalled now (the file's modification time and the wall clock).
    Raises FileNotFoundError if ``path`` is not a file.
    """
    run = Run(path, config, max_points=256)
    if not run.path.is_file():
        raise FileNotFoundError(str(path))
    tailer = FileTailer(run.path)
    corrupt_seen: list[CorruptLine] = []
    try:
        while True:
            chunk = tailer.poll()
            if chunk is None:
                break
            if chunk.reset:
                run.reset(chunk.reason)
                corrupt_seen.clear()
            batch, corrupt = parse_lines(chunk.lines, chunk.first_line_no)
            run.ingest(batch, corrupt)
            corrupt_seen.extend(corrupt[: max(0, keep_corrupt - len(corrupt_seen))])
            if not chunk.more:
                break
        run.exists = True
        run.alerts.extend(run.engine.finish())  # the file is complete: delayed verdicts are final
        if stall:
            run.check_stall(time.time(), os.stat(run.path).st_mtime)
        if tailer.partial.strip():
            bad = CorruptLine(tailer.line_no + 1, "incomplete last line (no newline)")
            run.state.note_corrupt(bad)
            if len(corrupt_seen) < keep_corrupt:
                corrupt_seen.append(bad)
    finally:
        tailer.close()
    return run, corrupt_seen
