"""Preemption signals, and the fault hooks the tests use to kill or signal a rank at a chosen point.

`PreemptionFlag` turns SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C, or the DeepSpeed launcher
forwarding either) into a flag the trainer reads at the next step boundary; it rides on the step's existing
flag all-reduce, so every rank learns of a signal sent to any one of them without an extra sync.

NPT_DS_TEST_FAULT="ACTION:rank=R:step=S" (a test aid) makes rank R, once step S has run, do ACTION:
`term` (send itself SIGTERM), `kill` (SIGKILL: a lost rank) or `kill-in-save` (SIGKILL inside the checkpoint
save of step S, after the shards are written and before the step dir is renamed into place).  The hook fires
in the first attempt of a job only (NPT_DS_RESTART unset or 0), so a restarted job runs clean.  Before it
fires it writes RUN_DIR/fault-{time}.json with the wall time, so a test can measure how long the others took.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


class PreemptionFlag:
    """Set by SIGTERM/SIGINT; `signal_name` says which arrived first."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def set(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class FaultHook:
    action: str
    rank: int
    step: int

    @classmethod
    def from_env(cls, rank: int) -> "FaultHook | None":
        spec = os.environ.get("NPT_DS_TEST_FAULT", "")
        if not spec or int(os.environ.get("NPT_DS_RESTART", "0") or 0) > 0:
            return None
        action, *fields = spec.split(":")
        kv = dict(f.split("=", 1) for f in fields)
        hook = cls(action, int(kv.get("rank", 0)), int(kv.get("step", 1)))
        if hook.action not in ("term", "kill", "kill-in-save"):
            raise ValueError(f"NPT_DS_TEST_FAULT: unknown action {action!r}; use term, kill or kill-in-save")
        return hook if hook.rank == rank else None

    def fire(self, run_dir: Path) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / f"fault-{self.action}-rank{self.rank}.json").write_text(
            json.dumps({"action": self.action, "rank": self.rank, "step": self.step, "time": time.time()}))
        os.kill(os.getpid(), signal.SIGTERM if self.action == "term" else signal.SIGKILL)

    def after_step(self, step: int, run_dir: Path) -> None:
        if self.action in ("term", "kill") and step == self.step:
            self.fire(run_dir)

    def in_save(self, step: int, run_dir: Path) -> None:
        if self.action == "kill-in-save" and step == self.step:
            self.fire(run_dir)
