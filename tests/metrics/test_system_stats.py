"""This rank's system figures (npt_ds.metrics.system) with NVML mocked, and their place in the gathered row."""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pynvml
import pytest
import torch

from npt_ds.config import load_config
from npt_ds.metrics.rank_stats import RankStats, summarize
from npt_ds.metrics.system import CPU_FIELDS, GPU_FIELDS, SLOTS, SystemSampler, system_keys


class FakeNVML:
    """NVML as nvidia-ml-py exposes it, for one GPU: what each call got, what it answers."""

    def __init__(self, monkeypatch, *, power_supported: bool = True, uuid_known: bool = True,
                 library: bool = True) -> None:
        self.calls: list[tuple] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"uuid-of-{i}"))

        def init():
            self.calls.append(("init",))
            if not library:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

        def by_uuid(uuid):
            self.calls.append(("uuid", uuid))
            if not uuid_known:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return "handle-by-uuid"

        def by_index(i):
            self.calls.append(("index", i))
            return "handle-by-index"

        def power(h):
            if not power_supported:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return 412_345  # mW

        def temperature(h, sensor):
            assert sensor == pynvml.NVML_TEMPERATURE_GPU
            return 71

        for name, fn in (("nvmlInit", init), ("nvmlDeviceGetHandleByUUID", by_uuid),
                         ("nvmlDeviceGetHandleByIndex", by_index), ("nvmlDeviceGetPowerUsage", power),
                         ("nvmlDeviceGetTemperature", temperature),
                         ("nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=87, memory=40)),
                         ("nvmlDeviceGetMemoryInfo", lambda h: SimpleNamespace(used=34_200_000_000,
                                                                               total=80_000_000_000))):
            monkeypatch.setattr(pynvml, name, fn)


def test_gpu_figures_come_from_nvml_for_torchs_device(monkeypatch):
    nvml = FakeNVML(monkeypatch)
    sampler = SystemSampler()
    assert sampler.fields == GPU_FIELDS and sampler.handle == "handle-by-uuid"
    assert nvml.calls == [("init",), ("uuid", "GPU-uuid-of-1")]  # torch's current device, found by its UUID
    assert sampler.sample() == [87.0, 34.2, 412.345, 71.0]
    assert system_keys(3, sampler.sample(), sampler.fields) == {
        "sys/3/gpu_util": 87.0, "sys/3/gpu_mem_gb": 34.2, "sys/3/gpu_power_w": 412.345, "sys/3/gpu_temp_c": 71.0}


def test_a_figure_the_board_does_not_report_is_left_out(monkeypatch):
    FakeNVML(monkeypatch, power_supported=False)
    sampler = SystemSampler()
    row = sampler.sample()
    assert row[:2] == [87.0, 34.2] and math.isnan(row[2]) and row[3] == 71.0
    assert "sys/0/gpu_power_w" not in system_keys(0, row, sampler.fields)


def test_without_the_uuid_the_device_index_is_used_and_without_nvml_nothing_is_logged(monkeypatch):
    nvml = FakeNVML(monkeypatch, uuid_known=False)
    assert SystemSampler(device=0).handle == "handle-by-index" and nvml.calls[-1] == ("index", 0)
    FakeNVML(monkeypatch, library=False)
    sampler = SystemSampler()
    assert sampler.fields == GPU_FIELDS and sampler.handle is None
    assert all(math.isnan(v) for v in sampler.sample()) and system_keys(0, sampler.sample(), sampler.fields) == {}


def test_cpu_runs_log_the_process_cpu_share_since_the_window_started(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sampler = SystemSampler()
    assert sampler.fields == CPU_FIELDS
    sampler.mark()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.3:  # one core busy
        pass
    busy = sampler.sample()
    assert len(busy) == SLOTS and all(math.isnan(v) for v in busy[1:])
    sampler.mark()
    time.sleep(0.3)
    idle = sampler.sample()[0]
    assert busy[0] > 50.0 and idle < 20.0, (busy, idle)
    assert list(system_keys(0, busy, sampler.fields)) == ["sys/0/cpu_pct"]


def test_summarize_writes_every_ranks_figures_from_the_widened_row():
    rows = [[0.10, 1.0, 1.5, 0.30, 97.0, 34.2, 410.0, 71.0], [0.25, 2.0, 2.5, 0.31, 31.0, 36.8, math.nan, 84.0]]
    out = summarize(rows, flops_per_step=None, peak_tflops=None, tokens_per_s=900.0, system_fields=GPU_FIELDS)
    assert {k: v for k, v in out.items() if k.startswith("sys/")} == {
        "sys/0/gpu_util": 97.0, "sys/0/gpu_mem_gb": 34.2, "sys/0/gpu_power_w": 410.0, "sys/0/gpu_temp_c": 71.0,
        "sys/1/gpu_util": 31.0, "sys/1/gpu_mem_gb": 36.8, "sys/1/gpu_temp_c": 84.0}
    assert out["time/slowest_rank"] == 1 and out["rank/1/step_s"] == 0.25  # the first four columns as before
    assert not [k for k in summarize([r[:4] for r in rows], None, None, 900.0) if k.startswith("sys/")]


def test_rank_stats_gathers_the_figures_in_its_one_row(monkeypatch):
    """On a log step the figures ride in the row every rank gathers anyway: no collective of their own."""
    import npt_ds.metrics.rank_stats as rank_stats

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gathered = []
    monkeypatch.setattr(rank_stats, "gather_rows", lambda row: gathered.append(row) or [row])
    stats = RankStats(load_config("configs/tiny_debug.yaml"), rank=0, world=1)
    stats.step_done()
    out = stats.record(tokens_per_s=100.0)
    assert len(gathered) == 1 and len(gathered[0]) == 4 + SLOTS
    assert out["sys/0/cpu_pct"] == round(gathered[0][4], 3) and "sys/0/gpu_util" not in out
