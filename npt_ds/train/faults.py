"""Preemption signals, and the fault hooks the tests use to kill or signal a rank at a chosen point.

`PreemptionFlag` turns SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C, or the DeepSpeed launcher
forwarding either) into a flag the trainer reads at the next step boundary; it rides on the step's existing
flag all-reduce, so every rank learns of a signal sent to any one of them without an extra sync.

NPT_DS_TEST_FAULT="ACTION:rank=R:step=S" (a test aid) makes rank R, once step S has run, do ACTION:
`term` (send itself SIGTERM), `kill` (SIGKILL: a lost rank), `stop` (SIGSTOP: a rank that hangs without dying,
its threads too), `hang` (its loop sleeps for good while its threads run on: a stuck kernel or read), `raise` (a
local error whose text mentions NCCL and CUDA) or `kill-in-save` (SIGKILL inside the checkpoint save of step S,
after the shards are written and before the step dir is renamed into place).  The hook fires
in the first attempt of a job only (NPT_DS_RESTART unset or 0), so a restarted job runs clean.  Before it
fires it writes RUN_DIR/fault-{time}.json with the wall time, so a test can measure how long the others took.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


# what a collective raises when a peer is gone (gloo's transport; NCCL and the store raise DistError subclasses)
PEER_FAILURES = ("connection closed by peer", "connection reset by peer", "broken pipe",
                 "timed out waiting", "for recv operation to complete", "for send operation to complete")


def communication_failure(exc: BaseException) -> bool:
    """Whether `exc` came out of a collective or the store (a DistError, or gloo's transport reporting a peer),
    as opposed to this rank's own failure.  Only a candidate: the watchdog's heartbeats then tell whether a peer
    is really gone (a local NCCL/CUDA fault is a DistBackendError too)."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(k in text for k in PEER_FAILURES))


def dump_flight_recorder(run_dir: Path, rank: int) -> bool:
    """Write this rank's NCCL flight record (the collectives in flight: who waited for whom) into
    RUN_DIR/nccl-trace/rank_<r>, as NCCL's own timeout would; False where this torch build has no NCCL."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None:
        return False
    try:
        data = dump(True, True, False)
    except Exception:  # noqa: BLE001 - no NCCL process group in this process
        return False
    out = Path(run_dir) / "nccl-trace"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{rank}").write_bytes(data)
    return True


class SurvivingOutput:
    """A rank's stdout / stderr that outlives its reader.  When DeepSpeed's pdsh runner is signalled it kills pdsh
    at once, closing the ssh sessions whose pipes are the remote ranks' output, and only then signals the remote
    launchers: a preempted rank must not die of EPIPE on its next progress line before it has saved.  Once the
    reader is gone, the file descriptor is pointed at /dev/null (for every writer, native code included)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    @classmethod
    def install(cls) -> None:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, cls):
                setattr(sys, name, cls(stream))


def record_env_for_test(run_dir: Path, rank: int, names: str | None = None) -> None:
    """Test aid: NPT_DS_TEST_RECORD_ENV="A,B" makes each rank write RUN_DIR/env-rank<r>.json with those variables
    as it sees them (the secrets test checks they arrive byte for byte)."""
    names = os.environ.get("NPT_DS_TEST_RECORD_ENV", "") if names is None else names
    if names:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / f"env-rank{rank}.json").write_text(
            json.dumps({k: os.environ.get(k) for k in names.split(",")}))


ACTIONS = ("term", "kill", "stop", "hang", "raise", "kill-in-save")
SIGNALS = {"term": signal.SIGTERM, "kill": signal.SIGKILL, "stop": signal.SIGSTOP, "kill-in-save": signal.SIGKILL}


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
        if hook.action not in ACTIONS:
            raise ValueError(f"NPT_DS_TEST_FAULT: unknown action {action!r}; use one of {', '.join(ACTIONS)}")
        return hook if hook.rank == rank else None

    def fire(self, run_dir: Path) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / f"fault-{self.action}-rank{self.rank}.json").write_text(
            json.dumps({"action": self.action, "rank": self.rank, "step": self.step, "time": time.time()}))
        if self.action == "hang":
            while True:
                time.sleep(3600)
        if self.action == "raise":
            raise RuntimeError("NCCL error in: injected by NPT_DS_TEST_FAULT, unhandled cuda error (a local fault; "
                               "every peer is alive)")
        os.kill(os.getpid(), SIGNALS[self.action])

    def after_step(self, step: int, run_dir: Path) -> None:
        if self.action != "kill-in-save" and step == self.step:
            self.fire(run_dir)

    def in_save(self, step: int, run_dir: Path) -> None:
        if self.action == "kill-in-save" and step == self.step:
            self.fire(run_dir)
