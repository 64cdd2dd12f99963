"""Node topology under each launcher's environment (DeepSpeed, torchrun, srun, none): ranks per node, hpz's
partition, `auto` picking hpz across nodes, Slurm's rank variables, the GPU check, and `npt-ds resolve`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from npt_ds.cli import main as npt_ds
from npt_ds.config import ConfigError, load_config
from npt_ds.parallel import groups
from npt_ds.parallel.ds_config import build_ds_config
from npt_ds.parallel.resolve import Device, resolve
from npt_ds.parallel.topology import (check_allocation, cuda_device_index, detect_topology, gpu_check,
                                      parse_tasks_per_node)

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "configs" / "llama3_8b_multinode.yaml")
BIG = "model.path=llama-3.1-70b"  # a shape preset: resident needs ~137 GiB, more than an 80 GiB GPU

# rank 9 of 2 nodes x 8: what each launcher puts in the environment of that rank
LAUNCHERS = {
    "deepspeed": {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_SIZE": "8", "CROSS_SIZE": "2",
                  "CROSS_RANK": "1", "MASTER_ADDR": "node-01", "MASTER_PORT": "29500"},
    "torchrun": {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
                 "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "node-01",
                 "MASTER_PORT": "29500"},
    "slurm": {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NNODES": "2",
              "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "8(x2)",
              "SLURM_STEP_TASKS_PER_NODE": "8(x2)"},
    "none": {"RANK": "9", "LOCAL_RANK": "9", "WORLD_SIZE": "16"},
}
KEYS = sorted({k for env in LAUNCHERS.values() for k in env} | {
    "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "NPT_DS_WORLD_SIZE"})


@pytest.fixture
def launched(monkeypatch):
    """Put this process under a launcher's environment (and nothing of any other launcher)."""
    def under(launcher: str, **extra: str) -> dict:
        for key in KEYS:
            monkeypatch.delenv(key, raising=False)
        env = {**LAUNCHERS[launcher], **extra}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env
    return under


H100 = Device("NVIDIA H100 80GB HBM3", 80.0, True, "--gpu-mem/--gpu-name")


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "slurm"])
def test_each_launcher_gives_two_nodes_of_eight(launcher):
    topo = detect_topology(LAUNCHERS[launcher])
    assert (topo.launcher, topo.nodes, topo.per_node, topo.node_rank, topo.rank, topo.local_rank, topo.world) == \
        (launcher, 2, 8, 1, 9, 1, 16)
    assert topo.uniform and topo.hpz_partition_size == 8


def test_without_a_launcher_every_rank_is_on_one_node():
    topo = detect_topology(LAUNCHERS["none"])
    assert (topo.launcher, topo.nodes, topo.per_node, topo.world) == ("none", 1, 16, 16)
    assert detect_topology({}).world == 1


@pytest.mark.parametrize("launcher,mode,hpz", [
    ("deepspeed", "hpz", 8), ("torchrun", "hpz", 8), ("slurm", "hpz", 8), ("none", "partitioned", None)])
def test_auto_picks_hpz_across_nodes_when_the_base_does_not_fit_resident(launcher, mode, hpz):
    """Llama-3.1-70B on 80 GiB GPUs, 2 nodes x 8: resident does not fit; across nodes `auto` keeps the re-gathers
    within a node of 8 (before: only torchrun's LOCAL_WORLD_SIZE was read, so DeepSpeed's launcher -- every
    launch/*.sh -- and srun looked like one node of 16 and never got hpz)."""
    topo = detect_topology(LAUNCHERS[launcher])
    res = resolve(load_config(RECIPE, [BIG]), topo, H100)
    assert res.cfg.deepspeed.frozen_base == mode, res.frozen_base_why
    assert "does not fit resident" in res.frozen_base_why
    ds = build_ds_config(res.cfg, topo.world, topo.hpz_partition_size)
    assert ds["zero_optimization"].get("zero_hpz_partition_size") == hpz


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "slurm"])
def test_configured_hpz_partitions_within_a_node(launcher):
    topo = detect_topology(LAUNCHERS[launcher])
    res = resolve(load_config(RECIPE, ["deepspeed.frozen_base=hpz"]), topo, H100)
    assert build_ds_config(res.cfg, topo.world, topo.hpz_partition_size)["zero_optimization"][
        "zero_hpz_partition_size"] == 8


def test_the_8b_base_stays_resident_on_two_nodes():
    res = resolve(load_config(RECIPE), detect_topology(LAUNCHERS["slurm"]), H100)
    assert res.cfg.deepspeed.frozen_base == "resident"


@pytest.mark.parametrize("text,counts", [("8(x2)", [8, 8]), ("4(x2),2", [4, 4, 2]), ("1", [1]),
                                         ("2,3(x1)", [2, 3])])
def test_slurm_tasks_per_node_is_uncompressed(text, counts):
    assert parse_tasks_per_node(text) == counts


def test_slurm_uneven_nodes_refuse_hpz_and_auto_stays_partitioned():
    env = {**LAUNCHERS["slurm"], "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_STEP_NUM_TASKS": "10",
           "SLURM_NODEID": "2", "SLURM_PROCID": "8"}
    topo = detect_topology(env)
    assert (topo.nodes, topo.per_node, topo.uniform, topo.hpz_partition_size) == (3, 2, False, None)
    with pytest.raises(ConfigError) as err:
        resolve(load_config(RECIPE, ["deepspeed.frozen_base=hpz"]), topo, H100)
    assert str(err.value) == ("deepspeed.frozen_base: hpz needs the same number of ranks on every node "
                              "(SLURM_STEP_TASKS_PER_NODE=4(x2),2); use partitioned, or start as many ranks on each node")
    assert resolve(load_config(RECIPE, [BIG]), topo, H100).cfg.deepspeed.frozen_base == "partitioned"


def test_slurm_ntasks_per_node_alone_and_bad_values():
    env = {k: v for k, v in LAUNCHERS["slurm"].items() if "TASKS_PER_NODE" not in k}
    assert detect_topology({**env, "SLURM_NTASKS_PER_NODE": "8"}).per_node == 8
    with pytest.raises(ConfigError, match=r"SLURM_STEP_TASKS_PER_NODE='8x2' is not Slurm's tasks-per-node form"):
        detect_topology({**LAUNCHERS["slurm"], "SLURM_STEP_TASKS_PER_NODE": "8x2"})
    with pytest.raises(ConfigError, match=r"LOCAL_SIZE='eight' is not an integer"):
        detect_topology({**LAUNCHERS["deepspeed"], "LOCAL_SIZE": "eight"})


def test_srun_ranks_get_torch_rank_variables(launched, monkeypatch):
    """srun sets no RANK/LOCAL_RANK/WORLD_SIZE: init maps Slurm's, and refuses to start without a rendezvous."""
    launched("slurm")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set under srun; start the ranks with "
                                          "launch/train_slurm.sbatch"):
        groups.init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(groups.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(groups.dist, "get_rank", lambda: 9)
    monkeypatch.setattr(groups.dist, "get_world_size", lambda: 16)
    assert groups.init_distributed() == (9, 16)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("9", "1", "16")


@pytest.mark.parametrize("extra,message", [
    ({"SLURM_JOB_NUM_NODES": "4"}, "world size: the ranks span 2 of the allocation's 4 nodes (16 ranks); start them "
                                   "on every node (srun --nodes=4, as launch/train_slurm.sbatch does)"),
    ({"NPT_DS_WORLD_SIZE": "32"}, "world size: 16 rank(s) started but the allocation holds 32"),
    ({"SLURM_LOCALID": "4", "SLURM_DISTRIBUTION": "cyclic"},
     "rank 9 is local rank 4 of node 1: srun placed the ranks round-robin (SLURM_DISTRIBUTION=cyclic), but hpz and "
     "DeepSpeed expect each node's ranks to be consecutive; use srun --distribution=block"),
])
def test_ranks_that_do_not_fill_the_allocation_are_refused(extra, message):
    """Never a silently smaller job (a step on fewer nodes, fewer ranks than the batch script expects), and each
    node's ranks consecutive."""
    env = {**LAUNCHERS["slurm"], **extra}
    with pytest.raises(ConfigError) as err:
        check_allocation(detect_topology(env), env)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    check_allocation(detect_topology(LAUNCHERS["slurm"]), {**LAUNCHERS["slurm"], "NPT_DS_WORLD_SIZE": "16"})


@pytest.mark.parametrize("launcher,visible,extra,warning", [
    ("deepspeed", 8, {}, None),
    ("deepspeed", 4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
     "npt-ds: warning: 8 rank(s) on this node (LOCAL_SIZE=8, CROSS_SIZE=2) but it shows 4 GPU(s) "
     "(CUDA_VISIBLE_DEVICES=0,1,2,3); ranks share GPUs: start at most one rank per GPU, or expose more "
     "(CUDA_VISIBLE_DEVICES, --gpus-per-node)"),
    ("torchrun", 16, {}, "npt-ds: warning: 8 rank(s) on this node (LOCAL_WORLD_SIZE=8, GROUP_WORLD_SIZE=2) but it "
                         "shows 16 GPU(s); some GPUs stay idle: start one rank per GPU"),
    ("slurm", 1, {"SLURM_GPUS_ON_NODE": "8"}, None),  # --gpus-per-task=1: each rank sees its one GPU
    ("slurm", 1, {}, None),  # bound per rank by hand
    ("slurm", 1, {"SLURM_GPUS_ON_NODE": "4"},
     "npt-ds: warning: 8 rank(s) on this node (SLURM_STEP_TASKS_PER_NODE=8(x2)) but it shows 4 GPU(s); ranks share "
     "GPUs: start at most one rank per GPU, or expose more (CUDA_VISIBLE_DEVICES, --gpus-per-node)"),
])
def test_gpus_this_node_shows_are_checked_against_its_ranks(launcher, visible, extra, warning):
    env = {**LAUNCHERS[launcher], **extra}
    assert gpu_check(detect_topology(env), visible, env) == warning


def test_a_rank_bound_to_one_gpu_uses_device_0_and_one_line_per_node(launched, monkeypatch, capsys):
    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setattr(groups.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(groups.dist, "get_rank", lambda: 9)
    monkeypatch.setattr(groups.dist, "get_world_size", lambda: 16)
    launched("deepspeed")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES=<its own GPU>
    groups.init_distributed()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    groups.init_distributed()
    assert picked == [0, 1] and cuda_device_index(detect_topology(LAUNCHERS["deepspeed"]), 8) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    launched("deepspeed", LOCAL_RANK="0", RANK="8")
    groups.init_distributed()
    launched("deepspeed")  # local rank 1 of the same node: silent
    groups.init_distributed()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("npt-ds: warning: 8 rank(s) on this node (LOCAL_SIZE=8")


# ---------------------------------------------------------------- npt-ds resolve
@pytest.mark.parametrize("launcher,mode,hpz", [("deepspeed", "hpz", 8), ("slurm", "hpz", 8), ("none", "partitioned", None)])
def test_resolve_reads_the_launchers_layout(launched, capsys, launcher, mode, hpz):
    launched(launcher)
    assert npt_ds(["resolve", RECIPE, BIG, "--gpu-mem", "80", "--gpu-name", "NVIDIA H100 80GB HBM3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"]["launcher"] == launcher and out["frozen_base"]["mode"] == mode
    assert out["hpz_partition_size"] == hpz and out["device"]["memory_gib"] == 80.0
    assert out["deepspeed_config"]["zero_optimization"].get("zero_hpz_partition_size") == hpz
    assert out["deepspeed_config"]["train_batch_size"] == 1 * 4 * 16


def test_resolve_on_a_login_node_prints_the_layout_and_the_deepspeed_config(launched, capsys):
    launched("none", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    assert npt_ds(["resolve", RECIPE, BIG, "optim.grad_accum=2", "--nodes", "2", "--gpus-per-node", "8",
                   "--gpu-mem", "80", "--gpu-name", "NVIDIA A100-SXM4-80GB"]) == 0
    out = capsys.readouterr().out
    head, ds = out.split("deepspeed config:\n")
    assert head.splitlines() == [
        f"npt-ds resolve: {RECIPE}",
        "layout: 2 node(s) x 8 rank(s) = 16 rank(s); this process: rank 0, node 0, local rank 0 "
        "[flags: --nodes/--gpus-per-node]",
        "device: NVIDIA A100-SXM4-80GB, 80.0 GiB per rank (--gpu-mem/--gpu-name)",
        "precision: bf16 (as configured)",
        head.splitlines()[4],
        "hpz partition size: 8"]
    assert head.splitlines()[4].startswith("frozen base: hpz (the base does not fit resident (")
    ds = json.loads(ds)
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 8 and ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == 1 * 2 * 16


def test_resolve_names_the_gpu_for_precision_auto(launched, capsys):
    launched("none")
    for name, precision in (("NVIDIA H100 80GB HBM3", "bf16"), ("Tesla V100-SXM2-32GB", "fp32")):
        assert npt_ds(["resolve", RECIPE, "deepspeed.precision=auto", "--nodes", "1", "--gpus-per-node", "8",
                       "--gpu-mem", "32", "--gpu-name", name, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["precision"]["value"] == precision, name


@pytest.mark.parametrize("argv,message", [
    (["/no/such.yaml"], "npt-ds resolve: config file '/no/such.yaml' not found; pass a recipe"),
    ([RECIPE, "--nodes", "2"], "npt-ds resolve: --nodes and --gpus-per-node go together"),
    ([RECIPE, "--gpu-name", "H100"], "npt-ds resolve: --gpu-name 'H100' needs --gpu-mem"),
    ([RECIPE, "--gpu-mem", "0"], "npt-ds resolve: --gpu-mem must be > 0"),
    ([RECIPE, "--nodes", "0", "--gpus-per-node", "8"], "npt-ds resolve: --nodes and --gpus-per-node must be >= 1"),
    ([RECIPE, "optim.lrr=1"], "npt-ds resolve: unknown config key 'optim.lrr'; did you mean optim.lr?"),
    ([RECIPE, "deepspeed.frozen_base=quantized"], "npt-ds resolve: deepspeed.frozen_base: quantized needs"),
])
def test_resolve_errors_are_one_line_and_exit_2(launched, capsys, argv, message):
    launched("none")
    if "quantized" in argv[-1] and torch.cuda.is_available():
        pytest.skip("quantized is allowed on a CUDA machine")
    assert npt_ds(["resolve", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and captured.err.startswith(message), captured.err


def test_resolve_allows_quantized_for_a_named_gpu(launched, capsys):
    launched("none")
    assert npt_ds(["resolve", RECIPE, "deepspeed.frozen_base=quantized", "--gpu-mem", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deepspeed_config"]["zero_optimization"]["zero_quantized_nontrainable_weights"] is True


@pytest.mark.slow
@pytest.mark.multiproc
def test_srun_variables_win_over_a_launchers_left_in_the_environment(tmp_path, free_port):
    """Two srun ranks whose environment still holds RANK=0 WORLD_SIZE=1 (an earlier launcher's, exported in the
    submitting shell): they join one world of 2 as ranks 0 and 1, never two silent worlds of one."""
    import subprocess
    import sys

    code = "from npt_ds.parallel.groups import init_distributed; print('world', *init_distributed(60))"
    procs = []
    for r in (0, 1):
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "SLURM_STEP_ID": "0",
               "SLURM_PROCID": str(r), "SLURM_LOCALID": "0", "SLURM_NODEID": str(r), "SLURM_NTASKS": "2",
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NUM_NODES": "2",
               "SLURM_JOB_NUM_NODES": "2", "NPT_DS_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    worlds = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("world"))
    assert worlds == ["world 0 2", "world 1 2"], [err[-1500:] for _, err in outs]
