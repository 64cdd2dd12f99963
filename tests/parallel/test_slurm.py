"""launch/train_slurm.sbatch: the checks before anything starts (Slurm's variables faked), then a real two-node
Slurm cluster (tests/support/slurm_cluster.py): sbatch == train_local.sh, preemption signalled to the batch shell
and to the steps, requeue and resume, and the one-line errors of a real job."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.streams import last_logged_step

from npt_ds.parallel.groups import free_port
from npt_ds.parallel.slurm import main as slurm_layout
from support.slurm_cluster import SlurmCluster, unavailable

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "train_slurm.sbatch"
TINY = "configs/tiny_debug.yaml"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's or scheduler's variables (pytest may itself run under one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "NPT_DS_RESTART", "NPT_DS_WORLD_SIZE")}
    return {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


# ---------------------------------------------------------------- before anything starts (no cluster needed)
GPU_JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:8",
           "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]"}


@pytest.mark.parametrize("env,expected", [
    (GPU_JOB, {"NODES": "2", "RANKS_PER_NODE": "8", "WORLD": "16", "GPUS_PER_NODE": "8", "NEEDS_SHARED": "1"}),
    ({**GPU_JOB, "SLURM_GPUS_PER_NODE": "", "SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "4",
      "SLURM_NTASKS": "8"}, {"RANKS_PER_NODE": "4", "WORLD": "8", "GPUS_PER_NODE": "4"}),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "3(x2)", "SLURM_NTASKS_PER_NODE": "3",
      "SLURM_NTASKS": "6"}, {"RANKS_PER_NODE": "3", "WORLD": "6", "GPUS_PER_NODE": "0"}),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "1"},
     {"NODES": "1", "WORLD": "1", "NEEDS_SHARED": "0"}),
])
def test_the_allocation_gives_the_ranks(monkeypatch, capsys, env, expected):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert slurm_layout(["layout", TINY, "logging.run_dir=/shared/run"]) == 0
    values = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert {k: values[k] for k in expected} == expected and values["RUN_DIR"] == "/shared/run"


@pytest.mark.parametrize("env,overrides,message", [
    ({}, [], "error: not inside a Slurm allocation; submit with: sbatch --nodes N --gpus-per-node G "
             "launch/train_slurm.sbatch CONFIG"),
    ({**GPU_JOB, "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)"}, [],
     "error: tasks per node (--ntasks-per-node=4) do not match the 8 GPU(s) each node exposes; npt-ds starts one "
     "rank per GPU: drop --ntasks/--ntasks-per-node or make it 8 per node"),
    ({**GPU_JOB, "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"}, [],
     "error: tasks per node (SLURM_TASKS_PER_NODE=2,1) do not match the 8 GPU(s) each node exposes"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"}, [],
     "error: the allocation has unequal tasks per node (SLURM_TASKS_PER_NODE=2,1); give --ntasks-per-node"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NTASKS": "12",
      "SLURM_TASKS_PER_NODE": "8,4"}, [],
     "error: world size: 2 node(s) x 8 = 16 rank(s) but the allocation holds SLURM_NTASKS=12 tasks"),
    (GPU_JOB, ["optim.lrr=1"], "error: unknown config key 'optim.lrr'; did you mean optim.lr?"),
])
def test_a_wrong_allocation_is_one_line_and_exit_2(monkeypatch, capsys, env, overrides, message):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert slurm_layout(["layout", TINY, *overrides]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1 and out.err.startswith(message), out.err


def sbatch_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The batch script run by hand, as Slurm would run it (its variables faked)."""
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=clean_env(**env))


def test_the_script_refuses_a_missing_config_and_a_shell_outside_slurm(tmp_path):
    proc = sbatch_script("configs/nope.yaml", **GPU_JOB)
    assert proc.returncode == 2 and proc.stderr == ("error: config 'configs/nope.yaml' not found; usage: "
                                                    "launch/train_slurm.sbatch CONFIG.yaml [key.path=value ...]\n")
    proc = sbatch_script(TINY, f"logging.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: not inside a Slurm allocation")
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_script_starts_one_rank_per_gpu_in_node_blocks():
    proc = sbatch_script(TINY, "schedule.total_steps=5", DRY_RUN="1", MASTER_ADDR="10.0.0.1", **GPU_JOB)
    assert proc.returncode == 0, proc.stderr
    srun = [line for line in proc.stderr.splitlines() if line.startswith("+ srun")]
    assert srun == [f"+ srun --nodes=2 --ntasks=16 --ntasks-per-node=8 --distribution=block --kill-on-bad-exit=0 "
                    f"{sys.executable} -m npt_ds.train --config {REPO / TINY} schedule.total_steps=5"], proc.stderr


STUBS = {  # srun and scontrol stand-ins: record the call; srun exits FAKE_RC, optionally after logging `preempted`
    "srun": """#!/bin/bash
echo "srun NPT_DS_RESTART=$NPT_DS_RESTART NPT_DS_WORLD_SIZE=$NPT_DS_WORLD_SIZE $*" >> "$FAKE_LOG"
if [[ -n "${FAKE_PREEMPT:-}" ]]; then echo '{"step": 7, "event": "preempted"}' >> "$FAKE_RUN_DIR/metrics.jsonl"; fi
exit "$FAKE_RC"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
exit "${FAKE_SCONTROL_RC:-0}"
"""}


@pytest.mark.parametrize("rc,preempt,attempt,max_requeues,scontrol_rc,exit_code,said", [
    (0, False, 0, 3, 0, 0, []),  # finished
    (0, True, 0, 3, 0, 0, ["npt-ds: the job was preempted; requeue 1 of 3 (scontrol requeue 7)"]),
    (0, True, 3, 3, 0, 0, ["npt-ds: the job was preempted; no requeue left (MAX_REQUEUES=3)"]),
    (4, False, 1, 3, 0, 0, ["npt-ds: the job failed (exit 4); requeue 2 of 3"]),  # a lost or stalled rank
    (4, False, 0, 0, 0, 4, ["npt-ds: the job failed (exit 4); no requeue left (MAX_REQUEUES=0)"]),
    (1, False, 0, 1, 1, 1, ["npt-ds: the job failed (exit 1); requeue 1 of 1",
                            "npt-ds: scontrol requeue failed; resubmit the same command to continue"]),
    (2, False, 0, 3, 0, 2, []),  # a bad config: a rerun would fail the same way
    (3, False, 0, 3, 0, 3, []),  # diverged
])
def test_what_the_script_does_after_the_ranks_end(tmp_path, rc, preempt, attempt, max_requeues, scontrol_rc,
                                                  exit_code, said):
    """srun and scontrol stubbed: which endings requeue (a preemption, a failure such as a lost rank's exit 4),
    which do not (finished, no requeue left, a bad config, a divergence), and the requeued attempt's number."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, run_dir = tmp_path / "calls.log", tmp_path / "run"
    run_dir.mkdir()
    env = clean_env(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2", SLURM_NTASKS="2",
                    SLURM_TASKS_PER_NODE="2", SLURM_RESTART_COUNT=str(attempt), MAX_REQUEUES=str(max_requeues),
                    MASTER_ADDR="127.0.0.1", FAKE_LOG=str(log), FAKE_RC=str(rc), FAKE_RUN_DIR=str(run_dir),
                    FAKE_SCONTROL_RC=str(scontrol_rc), **({"FAKE_PREEMPT": "1"} if preempt else {}))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = subprocess.run(["bash", str(SCRIPT), TINY, f"logging.run_dir={run_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == exit_code, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith(f"srun NPT_DS_RESTART={attempt} NPT_DS_WORLD_SIZE=2 --nodes=1 --ntasks=2 ")
    requeued = any(re.search(r"; requeue \d+ of", line) for line in said)
    assert calls[1:] == (["scontrol requeue 7"] if requeued else [])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("npt-ds:")]
    assert len(lines) == len(said) and all(line.startswith(s) for line, s in zip(lines, said)), proc.stderr


# ---------------------------------------------------------------- a real Slurm cluster: nodea, nodeb


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm") / "cluster")
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        assert not slurm.root.exists()


def submit(cluster: SlurmCluster, out_dir: Path, *args: str, nodes: str = "--nodes=2",
           tasks: str = "--ntasks-per-node=1", **env: str) -> int:
    return cluster.sbatch(nodes, tasks, f"--output={out_dir}/slurm-%j.out", str(SCRIPT), *args,
                          env=cluster.env(**clean_env(GLOO_SOCKET_IFNAME="npt0", **env)))


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss; a step logged again by a later attempt replaces the earlier line."""
    return {r["step"]: r["loss/total"] for r in rows(run_dir) if r.get("event") == "train"}


def job_log(out_dir: Path, job: int) -> str:
    return (out_dir / f"slurm-{job}.out").read_text()


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The tiny recipe on 2 ranks by launch/train_local.sh, and the same by sbatch on nodea + nodeb."""
    base = tmp_path_factory.mktemp("slurm-runs")
    local = subprocess.run(["bash", str(REPO / "launch" / "train_local.sh"), TINY, f"logging.run_dir={base / 'local'}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=clean_env(NUM_RANKS="2", MASTER_PORT=str(free_port())))
    assert local.returncode == 0, local.stderr[-3000:]
    job = submit(cluster, base, TINY, f"logging.run_dir={base / 'sbatch'}")
    return base, job, cluster.wait(job)


@pytest.mark.multiproc
@pytest.mark.slow
def test_sbatch_on_two_nodes_trains_like_train_local(reference):
    base, job, info = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_log(base, job)[-3000:]
    start = next(r for r in rows(base / "sbatch") if r["event"] == "start")
    assert (start["run/launcher"], start["run/nodes"], start["run/ranks_per_node"], start["run/world_size"]) == \
        ("slurm", 2, 1, 2)
    local, slurm = losses(base / "local"), losses(base / "sbatch")
    assert sorted(slurm) == sorted(local) == list(range(1, 21))
    for step in local:
        assert slurm[step] == pytest.approx(local[step], abs=1e-6), step
    assert "+ srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --distribution=block" in job_log(base, job)


def signal_mid_run(cluster: SlurmCluster, base: Path, name: str, way: str, max_requeues: int) -> tuple[int, Path]:
    """Submit with rank 0 slowed to 0.5 s a step; once step 5 is logged, signal through Slurm."""
    run_dir = base / name
    job = submit(cluster, base, TINY, f"logging.run_dir={run_dir}", MAX_REQUEUES=str(max_requeues),
                 NPT_DS_TEST_SLEEP_RANK="0:0.5")
    deadline = time.time() + 120
    while last_logged_step(run_dir) < 5:
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), job_log(base, job)
        time.sleep(0.2)
    batch = ["--batch"] if way == "batch" else []
    cluster.run("scancel", *batch, "--signal=TERM", str(job))
    return job, run_dir


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("way", ["batch", "steps"])
def test_a_signal_through_slurm_checkpoints_and_the_job_exits_0(reference, cluster, way):
    """scancel --batch --signal=TERM reaches the batch shell only (as --signal=B:TERM@T does), which forwards it;
    scancel --signal=TERM reaches the ranks (as --signal=TERM@T does).  Either way every rank checkpoints, a
    `preempted` event is logged, and with MAX_REQUEUES=0 Slurm records exit 0."""
    base, *_ = reference
    job, run_dir = signal_mid_run(cluster, base, f"preempted-{way}", way, max_requeues=0)
    info = cluster.wait(job)
    log = job_log(base, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", log[-3000:]
    preempted = [r for r in rows(run_dir) if r.get("event") == "preempted"]
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGTERM", log[-3000:]
    stop = preempted[0]["step"]
    assert 5 <= stop < 20 and max(losses(run_dir)) == stop
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{stop:08d}"
    assert ("forwarding SIGTERM to the ranks" in log) == (way == "batch")
    assert "npt-ds: the job was preempted; no requeue left (MAX_REQUEUES=0)" in log


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_preempted_job_requeues_itself_and_resumes_the_same_losses(reference, cluster):
    base, *_ = reference
    job, run_dir = signal_mid_run(cluster, base, "requeued", "batch", max_requeues=1)
    info = cluster.wait(job)
    log = job_log(base, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-3000:]
    assert "npt-ds: the job was preempted; requeue 1 of 1" in log
    events = [r for r in rows(run_dir) if r.get("event") in ("preempted", "restart")]
    stop = events[0]["step"]
    assert [(e["event"], e["step"]) for e in events] == [("preempted", stop), ("restart", stop)]
    assert events[1]["restart"] == 1 and (run_dir / "checkpoints" / "latest").read_text() == "step-00000020"
    uninterrupted, resumed = losses(base / "sbatch"), losses(run_dir)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(stop + 1, 21):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step


@pytest.mark.parametrize("case", ["missing-config", "unequal-tasks", "node-local-run-dir"])
def test_errors_before_anything_starts_end_the_job_with_one_line_and_exit_2(cluster, tmp_path, case):
    """A real job: the config is checked, the allocation's tasks, and (across nodes) that every node sees the run
    dir -- here a dir on nodea's own disk, which nodeb cannot see.  Nothing is trained, nothing is left behind."""
    node_local = Path(cluster.hosts["NODE_LOCAL"]) / "run"
    args, tasks, message = {
        "missing-config": (["configs/nope.yaml"], "--ntasks-per-node=1",
                           "error: config 'configs/nope.yaml' not found; usage: launch/train_slurm.sbatch"),
        "unequal-tasks": ([TINY, f"logging.run_dir={tmp_path / 'run'}"], "--ntasks=3",
                          "error: the allocation has unequal tasks per node (SLURM_TASKS_PER_NODE=2,1)"),
        "node-local-run-dir": ([TINY, f"logging.run_dir={node_local}"], "--ntasks-per-node=1",
                               f"error: logging.run_dir {node_local} is not on a filesystem the nodes share (nodeb "
                               "cannot see it); put it on shared storage or set checkpoint.node_local=true"),
    }[case]
    job = submit(cluster, tmp_path, *args, tasks=tasks)
    info = cluster.wait(job, timeout=60)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert log.splitlines() == [log.splitlines()[0]] and log.startswith(message), log
    assert not (tmp_path / "run").exists()
    assert not list((cluster.hosts_dir / "local_a").iterdir())  # the probe's dir on nodea's disk was removed
