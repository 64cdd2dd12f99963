"""This rank's system figures for the metric stream, sampled on log steps only: GPU utilisation, memory in use,
power and temperature from NVML on CUDA runs; the process's CPU use on CPU runs.

:mod:`npt_ds.metrics.rank_stats` appends :meth:`SystemSampler.sample` to the row every rank already
all-gathers on a log step (no collective of its own) and rank 0 writes ``sys/{r}/<field>`` per rank
(:func:`system_keys`).  A figure the device does not report (NVML raises ``NVMLError_NotSupported`` for the
power of some boards) is NaN in the row and left out of the stream.
"""
from __future__ import annotations

import math
import time

import pynvml  # nvidia-ml-py: one small ctypes module (~25 ms to import); libnvidia-ml loads only in nvmlInit
import torch

GPU_FIELDS = ("gpu_util", "gpu_mem_gb", "gpu_power_w", "gpu_temp_c")
CPU_FIELDS = ("cpu_pct",)
SLOTS = len(GPU_FIELDS)  # the row's width for system figures, the same on every rank (CPU runs pad with NaN)


def nvml_handle(device: int):
    """NVML's handle of torch's CUDA device ``device``: by UUID (right under any CUDA_VISIBLE_DEVICES), else by
    index (right when CUDA_VISIBLE_DEVICES is unset)."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device)


class SystemSampler:
    """One rank's figures at each log step; ``fields`` names them (the same on every rank of a run)."""

    def __init__(self, device: int | None = None) -> None:
        self.handle = None
        self.fields: tuple[str, ...] = CPU_FIELDS
        if torch.cuda.is_available():
            self.fields = GPU_FIELDS
            try:
                pynvml.nvmlInit()
                self.handle = nvml_handle(torch.cuda.current_device() if device is None else device)
            except pynvml.NVMLError:  # no driver library (a container without it): the figures stay NaN
                self.handle = None
        self.mark()

    def mark(self) -> None:
        """Start a new CPU window (the rank-stats window: training steps only, not set-up, evals or saves)."""
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def sample(self) -> list[float]:
        """``SLOTS`` numbers: [GPU utilisation %, memory in use GB, power W, temperature °C] on CUDA, [CPU %
        since :meth:`mark` (100 = one core busy), NaN, NaN, NaN] on CPU; NaN where unknown."""
        if self.fields == GPU_FIELDS:
            return self._gpu()
        wall, cpu = time.perf_counter(), time.process_time()
        pct = 100.0 * (cpu - self._cpu) / (wall - self._wall) if wall > self._wall else math.nan
        return [pct] + [math.nan] * (SLOTS - 1)

    def _gpu(self) -> list[float]:
        h = self.handle
        reads = (lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu,  # % of the last sample period a kernel ran
                 lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 1e9,  # every process's, not only torch's
                 lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # mW
                 lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        out = []
        for read in reads:
            try:
                out.append(float(read()) if h is not None else math.nan)
            except pynvml.NVMLError:
                out.append(math.nan)
        return out


def system_keys(rank: int, values: list[float], fields: tuple[str, ...]) -> dict[str, float]:
    """``sys/{rank}/<field>`` for the finite figures of one rank's gathered row."""
    return {f"sys/{rank}/{name}": round(v, 3) for name, v in zip(fields, values) if math.isfinite(v)}
