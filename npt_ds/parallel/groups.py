"""Process groups: set-up for one process or a launch, the few collectives the loop needs, and the clock of
their waits (a rank's own step time is its wall time less that: :mod:`npt_ds.metrics.rank_stats`)."""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError
from .topology import check_allocation, cuda_device_index, detect_topology, gpu_check

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
    """Seconds this process spent blocked in collectives (a host float, no device sync), on CUDA the compute
    stream's waits in them (:class:`StreamClock`), and whether it is blocked in one right now (``inside_since``:
    the watchdog tells a rank that waits on its peers from a stuck one)."""

    def __init__(self, stream: StreamClock | None = None) -> None:
        self.seconds = 0.0
        self.stream = stream or StreamClock()
        self.inside_since: float | None = None
        self._depth = 0  # a collective inside a timed one is clocked once

    @contextlib.contextmanager
    def blocked(self):
        t = time.perf_counter()
        before = self.stream.begin() if self._depth == 0 else None
        if self._depth == 0:
            self.inside_since = t
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.inside_since = None
                self.seconds += time.perf_counter() - t
                self.stream.end(before)

    def timed(self, fn, *args, **kwargs):
        with self.blocked():
            return fn(*args, **kwargs)


WAIT = WaitClock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flight_recorder_env(run_dir: str | Path) -> dict[str, str]:
    """PyTorch's NCCL flight recorder, on by default on CUDA: a ring of the last 2000 collectives per rank, dumped
    into RUN_DIR/nccl-trace/rank_<r> when NCCL's watchdog times out (both the older TORCH_NCCL_* and the newer
    TORCH_FR_* names); `torchfrtrace RUN_DIR/nccl-trace --prefix rank_` names the ranks a collective waited for."""
    prefix = str(Path(run_dir) / "nccl-trace" / "rank_")
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_FR_BUFFER_SIZE": "2000",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
            "TORCH_FR_DUMP_TEMP_FILE": prefix}


def flight_recorder_command(run_dir: str | Path) -> str:
    return f"torchfrtrace {Path(run_dir) / 'nccl-trace'} --prefix rank_ --allow-incomplete-ranks"


def init_distributed(timeout_s: float | None = None, run_dir: str | Path | None = None) -> tuple[int, int]:
    """Initialise torch.distributed via DeepSpeed; works with or without the launcher. -> (rank, world).

    Under srun the rank variables come from Slurm's (:mod:`npt_ds.parallel.topology`), and the ranks must fill
    the allocation.  `timeout_s` bounds every collective (distributed.timeout_s): a rank waiting on a lost peer
    raises then.  On CUDA with a `run_dir`, the NCCL flight recorder is switched on (:func:`flight_recorder_env`; a
    user's own setting of any of its variables wins)."""
    import deepspeed  # lazy: ~2 s and accelerator chatter, paid only by a process that joins a group

    topo = detect_topology()
    if topo.launcher == "slurm":  # srun started this rank: its variables win over any left in the environment
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ConfigError(f"{key} is not set under srun; start the ranks with launch/train_slurm.sbatch "
                                  "(it picks the first node's address and a free port) or export it before srun")
        os.environ.update(topo.rank_env())
    check_allocation(topo)
    if "RANK" not in os.environ:  # plain `python -m npt_ds.train`: a world of one on loopback
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():  # before any CUDA allocation: rank r computes (and bitsandbytes loads) on GPU r
        visible = torch.cuda.device_count()
        warning = gpu_check(topo, visible)
        if warning and topo.local_rank == 0:  # one line per node
            print(warning, file=sys.stderr, flush=True)
        torch.cuda.set_device(gpu_index())
        if run_dir is not None:  # read when the NCCL process group is made, below
            for key, value in flight_recorder_env(run_dir).items():
                os.environ.setdefault(key, value)
            (Path(run_dir) / "nccl-trace").mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized():
        backend = "gloo" if not torch.cuda.is_available() else None
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend=backend, **kwargs)
        if not torch.cuda.is_available():  # DeepSpeed's CPU comm made this rank a shm buffer: gone at exit
            atexit.register(_unlink_quietly, shm_buffer_path(dist.get_rank()))
    expected = os.environ.get("NPT_DS_WORLD_SIZE")  # the allocation's ranks (launch/train_slurm.sbatch)
    if expected and int(expected) != dist.get_world_size():
        raise ConfigError(f"world size: the process group holds {dist.get_world_size()} rank(s) but the allocation "
                          f"{expected}; a launcher's RANK/WORLD_SIZE left in the environment?  Start the ranks with "
                          "launch/train_slurm.sbatch")
    return dist.get_rank(), dist.get_world_size()


def local_rank() -> int:
    """This process's rank on its node (the launcher's LOCAL_RANK; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def gpu_index() -> int:
    """This rank's GPU among those it sees: its local rank, or 0 when it sees one GPU (bound per task)."""
    return cuda_device_index(detect_topology(), torch.cuda.device_count())


def any_rank_flags(flags: torch.Tensor) -> list[bool]:
    """Element-wise: is the flag set on any rank?  One small MAX all-reduce and one host read for all flags."""
    t = flags.detach().reshape(-1).float()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [v > 0 for v in t.tolist()]
    with WAIT.blocked():  # the host read included: under NCCL that is where a rank waits for a slow peer
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [v > 0 for v in t.tolist()]


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (a world of one: [obj])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    WAIT.timed(dist.all_gather_object, out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
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


def exit_now(code: int) -> None:
    """End this process with `code` at once, when it stops outside the loop's orderly close (a bad config met
    after the group exists, a lost peer).  A process group left to the interpreter's teardown can abort the
    process instead ("terminate called without an active exception": exit 250 through pdsh, seen in CI on a
    resume disagreement), and a broken one can wait on the lost peer; so the output is flushed, this rank's shm
    buffer unlinked, and the teardown skipped."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if dist.is_initialized():
        release_shm_buffer(dist.get_rank())
    os._exit(code)


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


def compute_device() -> torch.device:
    """This rank's compute device: its GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
