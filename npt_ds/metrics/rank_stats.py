"""Per-rank step time, memory and FLOP rate for the metric stream: one small all-gather per log step.

Every rank keeps, without any sync, its wall time since the last log step and the part of it spent
blocked in collectives (:data:`WAIT`, fed by :mod:`npt_ds.metrics.comm` and the loop's NaN all-reduce).
A rank's own step time is ``(wall - blocked) / steps``: a rank that is slow for itself (slow device,
slow data) waits less for the others and shows the larger value, whereas the wall step time is the same
on every rank (the slowest one sets it).  Collectives that block the host (gloo: the CPU runs) are clocked on
the host.  Under NCCL a wait for a slower peer happens on the device stream instead, so on CUDA the own step
time is the compute stream's time less its waits in collectives, both from CUDA events
(:class:`npt_ds.parallel.groups.StreamClock`; read once per log step).  On a log step the ranks all-gather four
numbers each (own step time, peak memory, reserved memory, wall step time) and their system figures
(:mod:`npt_ds.metrics.system`), and rank 0 writes:

* ``time/step_s`` (rank 0's wall time per optimizer step), ``time/step_max_s``, ``time/step_min_s``,
  ``time/step_median_s`` (over the ranks' own step times), ``time/slowest_rank``;
* ``mem/peak_alloc_gb`` / ``mem/reserved_gb``: the max over ranks of ``torch.cuda.max_memory_allocated``
  / ``memory_reserved`` on GPU, of the process's peak / current RSS on CPU; ``mem/peak_rank`` holds it;
* ``rank/{r}/step_s``, ``rank/{r}/mem_gb`` per rank (up to :data:`MAX_RANKS_LOGGED` ranks), and
  ``sys/{r}/gpu_util``, ``gpu_mem_gb``, ``gpu_power_w``, ``gpu_temp_c`` (NVML) or ``sys/{r}/cpu_pct``;
* ``perf/tflops_per_device`` = :func:`npt_ds.planning.step_cost.step_flops` (the NPT step's FLOPs per device:
  frozen teacher forward, student modulated MLPs forward, their backward without base-weight gradients,
  activation recompute) / ``time/step_s``; ``perf/mfu`` = that / the device's bf16 peak
  (:func:`npt_ds.parallel.devices.peak_tflops`, or ``perf.peak_tflops``), absent when no peak is known;
* ``throughput/tokens_per_s_per_device``.

Test-only hook: ``NPT_DS_TEST_SLEEP_RANK=R:S`` makes rank R sleep S seconds in every step (a straggler).
"""
from __future__ import annotations

import os
import resource
import statistics
import time

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..parallel.devices import peak_tflops
from ..parallel.groups import WAIT, compute_device
from ..planning.inputs import inputs_from_config
from ..planning.step_cost import step_flops
from .system import SystemSampler, system_keys

MAX_RANKS_LOGGED = 64
SLEEP_ENV = "NPT_DS_TEST_SLEEP_RANK"


def sleep_for_rank(rank: int, env: str | None = None) -> float:
    """The test hook's sleep for `rank` (0 when unset or aimed at another rank)."""
    raw = os.environ.get(SLEEP_ENV, "") if env is None else env
    if not raw:
        return 0.0
    try:
        who, seconds = raw.split(":")
        return float(seconds) if int(who) == rank else 0.0
    except ValueError:
        raise ValueError(f"{SLEEP_ENV}={raw!r}: expected RANK:SECONDS, e.g. 1:0.2") from None


def memory_gb() -> tuple[float, float]:
    """(peak, reserved) GB of this rank: CUDA allocator on GPU, process peak / current RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.memory_reserved() / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    return peak, rss


def gather_rows(row: list[float]) -> list[list[float]]:
    """Every rank's `row` (same length on all ranks), on every rank: one all-gather."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [row]
    device = compute_device()
    mine = torch.tensor(row, dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows).tolist()


def summarize(rows: list[list[float]], flops_per_step: float | None, peak_tflops: float | None,
              tokens_per_s: float, system_fields: tuple[str, ...] = ()) -> dict[str, float | int]:
    """The stream's keys from the gathered rows ``[own step s, peak GB, reserved GB, wall step s, *system
    figures]`` (``system_fields`` names the figures)."""
    own = [r[0] for r in rows]
    slowest = max(range(len(rows)), key=own.__getitem__)
    peak_rank = max(range(len(rows)), key=lambda r: rows[r][1])
    step_s = rows[0][3]
    out: dict[str, float | int] = {
        "time/step_s": round(step_s, 6), "time/step_max_s": round(own[slowest], 6),
        "time/step_min_s": round(min(own), 6), "time/step_median_s": round(statistics.median(own), 6),
        "time/slowest_rank": slowest,
        "mem/peak_alloc_gb": round(rows[peak_rank][1], 4), "mem/peak_rank": peak_rank,
        "mem/reserved_gb": round(max(r[2] for r in rows), 4),
        "throughput/tokens_per_s_per_device": round(tokens_per_s / len(rows), 2),
    }
    for r, row in enumerate(rows[:MAX_RANKS_LOGGED]):
        out[f"rank/{r}/step_s"] = round(row[0], 6)
        out[f"rank/{r}/mem_gb"] = round(row[1], 4)
        out.update(system_keys(r, row[4:], system_fields))
    if flops_per_step and step_s > 0:
        tflops = flops_per_step / step_s / 1e12
        out["perf/tflops_per_device"] = round(tflops, 6)
        if peak_tflops:
            out["perf/mfu"] = round(tflops / peak_tflops, 6)
    return out


def step_flops_of(cfg, world: int) -> float | None:
    """FLOPs of one optimizer step per device for the run's config (None when the planner cannot read
    the model's shape)."""
    try:
        inputs = inputs_from_config(cfg, nodes=1, gpus_per_node=max(world, 1), gpu_mem_gib=1.0)
    except ConfigError:
        return None
    return step_flops(inputs, cfg.optim.grad_accum)


class RankStats:
    """The per-rank window between two log steps; `record()` is the log step's one collective."""

    def __init__(self, cfg, rank: int, world: int) -> None:
        self.flops_per_step = step_flops_of(cfg, world)
        self.peak_tflops, self.peak_source = peak_tflops(cfg.perf.peak_tflops)
        self.sleep = sleep_for_rank(rank)
        self.system = SystemSampler()
        self.last_window: dict = {}  # the last record()'s per-step wall, host-clocked and stream-clocked own times
        self.mark()

    def mark(self) -> None:
        """Start a new window (after set-up, an eval or a save: not a training step's time)."""
        self._t0, self._wait0, self.steps = time.perf_counter(), WAIT.seconds, 0
        self.system.mark()
        WAIT.stream.mark()

    def step_done(self) -> None:
        """After each optimizer step (host arithmetic only; the test hook sleeps here)."""
        if self.sleep:
            time.sleep(self.sleep)
        self.steps += 1

    def record(self, tokens_per_s: float) -> dict[str, float | int]:
        """Gather every rank's window, return the stream keys (on every rank), start a new window."""
        steps = max(self.steps, 1)
        wall = time.perf_counter() - self._t0
        host_own = max(wall - (WAIT.seconds - self._wait0), 0.0) / steps
        stream = WAIT.stream.read()  # CUDA: (stream seconds, of them waiting in collectives); None elsewhere
        own = host_own if stream is None else max(stream[0] - stream[1], 0.0) / steps
        self.last_window = {"wall_s": wall / steps, "host_own_s": host_own,
                            "stream_own_s": None if stream is None else own}
        peak, reserved = memory_gb()
        figures = self.system.sample()
        self.mark()  # the next window starts here: the wait in this gather belongs to it
        rows = WAIT.timed(gather_rows, [own, peak, reserved, wall / steps, *figures])
        return summarize(rows, self.flops_per_step, self.peak_tflops, tokens_per_s, self.system.fields)
