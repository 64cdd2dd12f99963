"""Process groups: set-up for one process or a launch, the few collectives the loop needs, and the clock of
their waits (a rank's own step time is its wall time less that: :mod:`npt_ds.metrics.rank_stats`)."""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist


class StreamClock:
    """On CUDA, the compute stream's side of the wait clock, from CUDA events (no host sync until `read`).

    Under NCCL a collective makes the stream it is issued on wait for the peers; the host does not block.  Events
    recorded on the compute stream (the current stream at `mark`) just before and just after each collective
    issued on it, and around each async handle's `wait` there, bracket that stream's waits; `read` gives the
    stream's time since `mark` and the bracketed part of it.  Collectives issued on other streams (ZeRO's own
    comm streams) are not bracketed: when the compute stream later waits for those streams, that wait counts as
    its own time.  `enabled`, `event` and `current_stream` are CUDA's; tests pass fakes.
    """

    def __init__(self, enabled=None, event=None, current_stream=None) -> None:
        self._enabled = enabled or torch.cuda.is_available
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._current = current_stream or torch.cuda.current_stream
        self.stream = None  # None: off (no CUDA, or not marked yet)
        self._start = None
        self._pairs: list[tuple] = []

    def mark(self) -> None:
        """Start a window on the current stream (off without CUDA)."""
        self.stream = self._current() if self._enabled() else None
        self._pairs = []
        self._start = self._record() if self.stream is not None else None

    def begin(self):
        """An event before a collective, or None when it is not issued on the window's stream."""
        return self._record() if self.stream is not None and self._current() == self.stream else None

    def end(self, before) -> None:
        if before is not None:
            self._pairs.append((before, self._record()))

    def read(self) -> tuple[float, float] | None:
        """(stream seconds since `mark`, seconds of them waiting in collectives), or None when off; waits for
        the stream to reach this point."""
        if self.stream is None:
            return None
        end = self._record()
        end.synchronize()
        span = self._start.elapsed_time(end) / 1e3
        return span, sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3

    def _record(self):
        event = self._event()
        event.record(self.stream)
        return event


class WaitClock:
    """Seconds this process spent blocked in collectives (a host float, no device sync), and on CUDA the compute
    stream's waits in them (:class:`StreamClock`)."""

    def __init__(self, stream: StreamClock | None = None) -> None:
        self.seconds = 0.0
        self.stream = stream or StreamClock()
        self._depth = 0  # a collective inside a timed one is clocked once

    def timed(self, fn, *args, **kwargs):
        t = time.perf_counter()
        before = self.stream.begin() if self._depth == 0 else None
        self._depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - t
                self.stream.end(before)


WAIT = WaitClock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise torch.distributed via DeepSpeed; works with or without the launcher. -> (rank, world).

    `timeout_s` bounds every collective (distributed.timeout_s): a rank waiting on a lost peer raises then."""
    import deepspeed  # lazy: ~2 s and accelerator chatter, paid only by a process that joins a group

    if "RANK" not in os.environ:  # plain `python -m npt_ds.train`: a world of one on loopback
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():  # before any CUDA allocation: rank r computes (and bitsandbytes loads) on GPU r
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        backend = "gloo" if not torch.cuda.is_available() else None
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend=backend, **kwargs)
        if not torch.cuda.is_available():  # DeepSpeed's CPU comm made this rank a shm buffer: gone at exit
            atexit.register(_unlink_quietly, shm_buffer_path(dist.get_rank()))
    return dist.get_rank(), dist.get_world_size()


def local_rank() -> int:
    """This process's GPU index on its node (the launcher's LOCAL_RANK; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def ranks_per_node(world: int) -> int:
    """GPUs (ranks) per node: the launcher's LOCAL_WORLD_SIZE when set, else every rank on one node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def any_rank_flags(flags: torch.Tensor) -> list[bool]:
    """Element-wise: is the flag set on any rank?  One small MAX all-reduce and one host read for all flags."""
    t = flags.detach().reshape(-1).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        WAIT.timed(dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def missing_ranks(wait_s: float = 3.0) -> list[int] | None:
    """After a failed collective: which ranks do not answer a roll call through the rendezvous store.

    Every surviving rank checks in and waits `wait_s`; None when the store itself is gone (it lives in
    rank 0's process, so rank 0 is the lost one)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"npt-ds/rollcall/{rank}", "here")
        deadline = time.time() + wait_s
        while time.time() < deadline:
            missing = [r for r in range(world) if not store.check([f"npt-ds/rollcall/{r}"])]
            if not missing:
                return []
            time.sleep(0.2)
        return missing
    except Exception:  # noqa: BLE001 - the store host is gone
        return None


def all_reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    WAIT.timed(dist.all_reduce, t)  # a peer still computing is its time, not ours (metrics.rank_stats)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """Tear the process group down in order before the process exits (every rank, after the last collective)."""
    if dist.is_initialized():
        rank = dist.get_rank()
        barrier()  # every rank is past its last shm all-reduce
        dist.destroy_process_group()
        release_shm_buffer(rank)


def shm_buffer_path(rank: int) -> Path:
    """DeepSpeed's CPU shared-memory all-reduce buffer of this rank (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's shm all-reduce buffer: DeepSpeed creates one (69 MB of RAM) per rank and run and
    never removes it, so a day of runs fills /dev/shm (the launch scripts also sweep a killed run's).  Every
    process that joins a CPU group through `init_distributed` also unlinks it at exit, whatever path it ends by
    (bench probes, tools; not a killed one)."""
    _unlink_quietly(shm_buffer_path(rank))


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
