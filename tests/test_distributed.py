"""Multi-process DeepSpeed runs through the real launch scripts (2 CPU ranks, gloo, ZeRO-3).

One uninterrupted run, one run stopped at step 10 and resumed, and one run on two simulated
nodes all share a NaN injected on rank 1 at step 3, so the same three runs check: falling loss,
bit-exact resume, multi-node == single-node, and NaN skipping on every rank.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

COMMON = ["schedule.total_steps=20", "checkpoint.every=10", "checkpoint.keep_last=3",
          "inject_nan={step: 3, rank: 1}", "logging.log_every=1"]


def launch(script: str, run_dir: Path, *overrides: str, port: int, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MASTER_PORT": str(port),
           "NUM_RANKS": "2", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = ["bash", str(REPO / "launch" / script), "configs/tiny_debug.yaml", f"logging.run_dir={run_dir}",
           *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if r.get("event") == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from npt_ds.distributed import free_port

    base = tmp_path_factory.mktemp("dist")
    launch("train_local.sh", base / "full", port=free_port())
    launch("train_local.sh", base / "resumed", "schedule.stop_at=10", port=free_port())
    second = launch("train_local.sh", base / "resumed", port=free_port())
    launch("train_loopback_2node.sh", base / "twonode", port=free_port())
    return base, second


def test_loss_falls_under_zero3(runs):
    base, _ = runs
    losses = train_losses(base / "full")
    assert sorted(losses) == list(range(1, 21))
    first, last = [losses[s] for s in range(1, 7)], [losses[s] for s in range(15, 21)]
    assert sum(last) / 6 < 0.85 * sum(first) / 6, losses


def test_resume_continues_the_same_trajectory(runs):
    base, second = runs
    assert "resumed from" in second.stdout
    full, resumed = train_losses(base / "full"), train_losses(base / "resumed")
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    ckpts = sorted(p.name for p in (base / "resumed" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000010", "step-00000020"]
    assert (base / "resumed" / "checkpoints" / "latest").read_text() == "step-00000020"
    meta = json.loads((base / "resumed" / "checkpoints" / "step-00000010" / "meta.json").read_text())
    assert meta["step"] == 10 and meta["data"]["batches_consumed"] == 11  # 10 steps + 1 skipped NaN batch
    # the frozen base is not in the checkpoint: a few hundred KB, not the model
    size = sum(f.stat().st_size for f in (base / "resumed" / "checkpoints" / "step-00000010").rglob("*") if f.is_file())
    assert size < 2_000_000


def test_two_loopback_nodes_match_one_node(runs):
    base, _ = runs
    full, twonode = train_losses(base / "full"), train_losses(base / "twonode")
    assert sorted(twonode) == sorted(full)
    for step in full:
        assert twonode[step] == pytest.approx(full[step], abs=1e-6), step


def test_nan_batch_on_one_rank_is_skipped_on_all(runs):
    base, _ = runs
    rows = [json.loads(line) for line in (base / "full" / "metrics.jsonl").read_text().splitlines()]
    nan_events = [r for r in rows if r.get("event") == "nan_step"]
    assert len(nan_events) == 1 and nan_events[0]["step"] == 3 and nan_events[0]["skipped_steps"] == 1
    train = [r for r in rows if r.get("event") == "train"]
    assert all(r["loss/total"] == r["loss/total"] for r in train)  # no NaN reached an optimizer step
    assert train[-1]["skipped_steps"] == 1 and train[-1]["step"] == 20


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["partitioned", "hpz"])
def test_frozen_base_modes_give_the_same_losses(runs, mode, free_port):
    """`full` runs with frozen_base auto (= resident here): every mode trains the same model, so the same
    losses exactly; resident gathers only the trainable parameters per step, partitioned the whole model."""
    base, _ = runs
    rows = metric_rows(base / "full")
    start = next(r for r in rows if r["event"] == "start")
    assert start["run/frozen_base"] == "resident" and start["run/trainable_params"] == 2 * (64 * 8 + 8 * 64 + 8 * 160)
    launch("train_local.sh", base / mode, f"deepspeed.frozen_base={mode}", port=free_port)
    other = metric_rows(base / mode)
    assert next(r for r in other if r["event"] == "start")["run/frozen_base"] == mode
    full, losses = train_losses(base / "full"), train_losses(base / mode)
    assert sorted(losses) == sorted(full)
    for step in full:
        assert losses[step] == full[step], step
    trainable_bytes = 4 * 2 * (64 * 8 + 8 * 64 + 8 * 160)  # fp32 NP params of layers 2, 3 (rank 8)
    gathered = {r["step"]: r["comm/gather_gb_per_step"] * 1e9 for r in rows if r["event"] == "train"}
    # steady state (ZeRO-3 re-gathers the model once in each of the first two steps, while it records its trace)
    # and right after a checkpoint the trainable parameters once more
    steady = [v for s, v in gathered.items() if s > 2]
    assert max(steady) <= 2.01 * trainable_bytes and statistics.median(steady) == pytest.approx(trainable_bytes, rel=1e-3)
    partitioned = [r["comm/gather_gb_per_step"] * 1e9 for r in other if r["event"] == "train"][2:]
    assert min(partitioned) > 20 * trainable_bytes  # the base's layers, every step
    # the planner's byte model (npt_ds.step_time) is exact for these runs
    from npt_ds.config import load_config
    from npt_ds.plan import inputs_from_config
    from npt_ds.step_time import mode_bytes

    inputs = inputs_from_config(load_config(REPO / "configs" / "tiny_debug.yaml", []), nodes=1, gpus_per_node=2,
                                gpu_mem_gib=24)
    assert statistics.median(steady) == pytest.approx(mode_bytes(inputs, "resident")["gathered"], abs=1)
    if mode == "partitioned":
        assert statistics.median(partitioned) == pytest.approx(mode_bytes(inputs, "partitioned")["gathered"], abs=1)
    reduced = [r["comm/reduce_gb_per_step"] * 1e9 for r in other if r["event"] == "train"][2:]
    # reduced: the gradients' reduce-scatter, plus DeepSpeed's 8-byte all-reduce of the gradient norm
    assert statistics.median(reduced) == pytest.approx(mode_bytes(inputs, mode)["reduced"] + 8, abs=1)


def test_quantized_frozen_base_is_refused_on_cpu(tmp_path):
    from npt_ds.train import main

    assert main(["configs/tiny_debug.yaml", f"logging.run_dir={tmp_path}", "deepspeed.frozen_base=quantized"]) == 2


def check_output(path: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "monitor", "--check", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc.stdout


def test_a_slowed_rank_is_named_a_straggler_and_healthy_ranks_are_not(runs, free_port):
    """Rank 1 sleeps 0.2 s per step (test hook): the stream's time/slowest_rank is 1 and --check names it;
    the same run without the hook (`full`) has per-rank stats and raises no straggler."""
    base, _ = runs
    launch("train_local.sh", base / "straggler", "schedule.total_steps=12", "checkpoint.every=0",
           "checkpoint.save_final=false", port=free_port, env={"NPT_DS_TEST_SLEEP_RANK": "1:0.2"})
    train = [r for r in metric_rows(base / "straggler") if r["event"] == "train"]
    assert len(train) == 12 and all(r["time/slowest_rank"] == 1 for r in train[1:])
    for r in train[1:]:  # rank 1's own step holds the 0.2 s sleep; rank 0 waits for it instead
        assert r["rank/1/step_s"] > 0.2 > r["rank/0/step_s"] and r["time/step_s"] > 0.2
        assert r["mem/peak_alloc_gb"] > 0.1 and r["perf/tflops_per_device"] > 0
    out = check_output(base / "straggler" / "metrics.jsonl")
    assert "WARNING straggler: rank 1 is a straggler" in out, out
    healthy = [r for r in metric_rows(base / "full") if r["event"] == "train"]
    assert all("time/step_max_s" in r and "rank/1/mem_gb" in r for r in healthy)
    assert "straggler" not in check_output(base / "full" / "metrics.jsonl")
