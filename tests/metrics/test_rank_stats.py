"""Per-rank timing, memory and FLOP rate of the metric stream (npt_ds.metrics.rank_stats)."""
from __future__ import annotations

import pytest
import torch

from npt_ds.config import NPTConfig, PerfConfig, ConfigError, load_config
from npt_ds.parallel.devices import peak_tflops
from npt_ds.metrics.rank_stats import RankStats, summarize, sleep_for_rank
from npt_ds.parallel.groups import WAIT


def test_summarize_takes_max_min_median_and_the_ranks_holding_them():
    rows = [[0.10, 1.0, 1.5, 0.30], [0.25, 2.0, 2.5, 0.31], [0.12, 3.0, 2.0, 0.30]]
    out = summarize(rows, flops_per_step=3e12, peak_tflops=20.0, tokens_per_s=900.0)
    assert out["time/step_s"] == 0.30 and out["time/step_max_s"] == 0.25 and out["time/step_min_s"] == 0.10
    assert out["time/step_median_s"] == 0.12 and out["time/slowest_rank"] == 1
    assert (out["mem/peak_alloc_gb"], out["mem/peak_rank"], out["mem/reserved_gb"]) == (3.0, 2, 2.5)
    assert out["rank/1/step_s"] == 0.25 and out["rank/2/mem_gb"] == 3.0
    assert out["perf/tflops_per_device"] == 10.0 and out["perf/mfu"] == 0.5  # 3e12 / 0.3 s = 10 TFLOP/s of 20
    assert out["throughput/tokens_per_s_per_device"] == 300.0
    assert "perf/mfu" not in summarize(rows, 3e12, None, 900.0)  # no peak known: tflops only
    assert "perf/tflops_per_device" not in summarize(rows, None, 20.0, 900.0)


def test_peak_table_and_config_key():
    assert peak_tflops(0.0, "NVIDIA H200") == (989.0, "NVIDIA H200 bf16 dense")
    assert peak_tflops(0.0, "NVIDIA H100 PCIe")[0] == 756.0 and peak_tflops(0.0, "NVIDIA H100 80GB HBM3")[0] == 989.0
    assert peak_tflops(0.0, "NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops(0.0, "Some GPU")[0] is None
    assert peak_tflops(123.0, "NVIDIA H200") == (123.0, "perf.peak_tflops")
    assert load_config("configs/tiny_debug.yaml", ["perf.peak_tflops=50"]).perf.peak_tflops == 50.0
    with pytest.raises(ConfigError, match="perf.peak_tflops"):
        PerfConfig(peak_tflops=-1)


def test_sleep_hook_parsing():
    assert sleep_for_rank(1, "1:0.2") == 0.2 and sleep_for_rank(0, "1:0.2") == 0.0
    assert sleep_for_rank(0, "") == 0.0
    with pytest.raises(ValueError, match="NPT_DS_TEST_SLEEP_RANK"):
        sleep_for_rank(0, "slow")


def test_own_step_time_excludes_time_blocked_in_collectives(monkeypatch):
    import time

    cfg = load_config("configs/tiny_debug.yaml", ["perf.peak_tflops=1"])
    stats = RankStats(cfg, rank=0, world=1)
    stats.mark()
    time.sleep(0.05)
    WAIT.seconds += 0.04  # as if 40 ms of it were spent waiting for other ranks
    stats.step_done()
    out = stats.record(tokens_per_s=100.0)
    assert out["time/step_s"] == pytest.approx(0.05, abs=0.02)
    assert out["time/step_max_s"] == pytest.approx(out["time/step_s"] - 0.04, abs=1e-3)
    assert out["perf/mfu"] == pytest.approx(stats.flops_per_step / out["time/step_s"] / 1e12, rel=1e-3)


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_mfu_flops_match_flop_counter_on_the_tiny_model(checkpointing, zero_stage, monkeypatch):
    """perf/tflops_per_device's FLOPs (npt_ds.planning.step_cost.step_flops through the run's config) against
    torch.utils.flop_counter on a real fused step of the tiny recipe, with and without activation recompute."""
    from torch.utils.flop_counter import FlopCounterMode

    from npt_ds.train.losses import NPTLoss
    from npt_ds.model import convert_model, npt_layers, tiny_llama
    from npt_ds.metrics.rank_stats import step_flops_of
    from npt_ds.train.module import NPTTrainModule, StepControls

    # ZeRO-3's zero.Init swaps F.linear for its own autograd function (for the rest of the process), which the
    # activation recompute reruns in full; the count runs under the linear the given stage trains with
    from deepspeed.runtime.zero.partition_parameters import zero3_linear_wrap

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap if zero_stage == 3 else torch._C._nn.linear)
    cfg = load_config("configs/tiny_debug.yaml", [f"model.activation_checkpointing={str(checkpointing).lower()}",
                                                  f"deepspeed.zero_stage={zero_stage}"])
    model = tiny_llama()
    convert_model(model, NPTConfig(layers=cfg.npt.layers, rank=cfg.npt.rank, num_ranks=cfg.npt.num_ranks))
    if checkpointing:
        for layer in npt_layers(model):
            layer.checkpoint_student = True
    module = NPTTrainModule(model, NPTLoss(cfg.loss, 2))
    ids = torch.randint(0, 256, (cfg.data.micro_batch_size, cfg.data.seq_len))
    with FlopCounterMode(display=False) as counter:
        loss, _ = module(ids, StepControls(diagnostics=False))
        loss.backward()
    from npt_ds.planning.inputs import inputs_from_config
    from npt_ds.planning.step_cost import step_flops

    inputs = inputs_from_config(cfg, nodes=1, gpus_per_node=1, gpu_mem_gib=1.0)
    assert inputs.activation_checkpointing is checkpointing
    # the CPU SDPA kernel has no flop-counter formula: the counter misses the attention core (4·T·q per token)
    core = step_flops(inputs) - step_flops(inputs, attention_core=False)
    assert 0 < core < 0.2 * step_flops(inputs)
    analytic = step_flops_of(cfg, world=1) - core
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.05)


class FakeEvent:
    """A CUDA event stand-in: `record` stamps the fake stream's clock; elapsed_time in ms like CUDA's."""

    def __init__(self, clock):
        self.clock, self.t, self.synced = clock, None, False

    def record(self, stream):
        assert stream == "compute"  # every event goes on the window's stream
        self.t = self.clock["now"]

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_stream_clock_brackets_the_compute_streams_waits_only():
    from npt_ds.parallel.groups import StreamClock, WaitClock

    clock = {"now": 0.0, "stream": "compute"}
    made = []

    def event():
        made.append(FakeEvent(clock))
        return made[-1]

    stream = StreamClock(enabled=lambda: True, event=event, current_stream=lambda: clock["stream"])
    wait = WaitClock(stream)
    stream.mark()

    def collective(seconds, inner=None):
        if inner:
            wait.timed(collective, *inner)  # a collective inside a timed one: clocked once
        clock["now"] += seconds

    clock["now"] = 1.0  # compute
    wait.timed(collective, 0.25)  # the compute stream waits 0.25 s for its peers
    clock["now"] += 0.5
    clock["stream"] = "side"  # ZeRO's own comm stream: not the compute stream's wait
    wait.timed(collective, 0.4)
    clock["stream"] = "compute"
    wait.timed(collective, 0.1, (0.05,))
    clock["now"] += 0.2
    span, waiting = stream.read()
    assert made[-1].synced  # read() waits for the stream, once per log step
    assert span == pytest.approx(1.0 + 0.25 + 0.5 + 0.4 + 0.15 + 0.2)
    assert waiting == pytest.approx(0.25 + 0.15)
    assert StreamClock(enabled=lambda: False).read() is None  # CPU: the host clock stays


def test_own_step_time_on_cuda_is_stream_time_less_its_collective_waits(monkeypatch):
    """On CUDA RankStats reports the stream clock's own time (the host's is kept in last_window)."""
    from npt_ds.parallel import groups

    cfg = load_config("configs/tiny_debug.yaml", [])
    readings = iter([(0.9, 0.3)])
    monkeypatch.setattr(groups.WAIT.stream, "mark", lambda: None)
    monkeypatch.setattr(groups.WAIT.stream, "read", lambda: next(readings))
    stats = RankStats(cfg, rank=0, world=1)
    for _ in range(3):
        stats.step_done()
    out = stats.record(tokens_per_s=1.0)
    assert out["rank/0/step_s"] == pytest.approx(0.2)  # (0.9 s of stream time - 0.3 s waiting) / 3 steps
    assert stats.last_window["stream_own_s"] == pytest.approx(0.2) and stats.last_window["host_own_s"] >= 0
