"""Which launcher started this process and the node layout it implies: ranks per node, nodes, this rank's
place; Slurm's rank variables mapped to torch's; on CUDA, a check against the GPUs this node shows.

Every launcher says how many ranks share a node, each in its own variables (ranks on this node; nodes; node rank):

* DeepSpeed's per-node launcher (``launch/*.sh``): ``LOCAL_SIZE``; ``CROSS_SIZE``; ``CROSS_RANK``.
* torchrun: ``LOCAL_WORLD_SIZE``; ``GROUP_WORLD_SIZE``; ``GROUP_RANK``.
* srun (``launch/train_slurm.sbatch``): ``SLURM_STEP_TASKS_PER_NODE``; ``SLURM_STEP_NUM_NODES``; ``SLURM_NODEID``.
* none (one process, or ``RANK``/``WORLD_SIZE`` set by hand): every rank on one node.

Slurm writes tasks per node compressed (``4(x2),2``: two nodes of 4, one of 2); ``SLURM_NTASKS_PER_NODE`` is set
only with ``--ntasks-per-node``.  A DeepSpeed launcher started by srun (``srun --ntasks-per-node=1 deepspeed
…``) is found as DeepSpeed: the innermost launcher wins.  srun sets no ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``;
:meth:`Topology.rank_env` supplies them from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_NUM_TASKS``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from ..config import ConfigError


@dataclass(frozen=True)
class Topology:
    launcher: str  # deepspeed | torchrun | slurm | none | flags (npt-ds resolve --nodes/--gpus-per-node)
    rank: int
    local_rank: int
    world: int
    per_node: int  # ranks on this process's node
    nodes: int
    node_rank: int
    uniform: bool  # every node runs per_node ranks
    source: str  # the variables it was read from

    @property
    def hpz_partition_size(self) -> int | None:
        """ZeRO++'s secondary partition: the ranks of one node; None when nodes differ in size."""
        return self.per_node if self.uniform else None

    def layout(self) -> str:
        shape = f"{self.nodes} node(s) x {self.per_node} rank(s)" if self.uniform else \
            f"{self.nodes} node(s) of unequal size ({self.per_node} on this one)"
        return (f"{shape} = {self.world} rank(s); this process: rank {self.rank}, node {self.node_rank}, "
                f"local rank {self.local_rank} [{self.launcher}: {self.source}]")

    def rank_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous reads (srun sets none of them)."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world)}


def detect_topology(env: Mapping[str, str] | None = None) -> Topology:
    """The layout the launcher of this process gave it (see the module docstring)."""
    env = os.environ if env is None else env
    if "LOCAL_SIZE" in env:
        return _from_counts(env, "deepspeed", "LOCAL_SIZE", "CROSS_SIZE", "CROSS_RANK")
    if "LOCAL_WORLD_SIZE" in env:
        return _from_counts(env, "torchrun", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "GROUP_RANK")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return _from_slurm(env)
    world = _int(env, "WORLD_SIZE", 1)
    return Topology("none", _int(env, "RANK", 0), _int(env, "LOCAL_RANK", 0), world, world, 1, 0, True,
                    "no launcher variables: every rank on one node")


def fixed_topology(nodes: int, per_node: int) -> Topology:
    """A layout given on the command line (``npt-ds resolve --nodes N --gpus-per-node G``): rank 0's view."""
    if nodes < 1 or per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    return Topology("flags", 0, 0, nodes * per_node, per_node, nodes, 0, True, "--nodes/--gpus-per-node")


def _from_counts(env: Mapping[str, str], launcher: str, size_key: str, nodes_key: str, node_rank_key: str
                 ) -> Topology:
    per_node = _int(env, size_key)
    world = _int(env, "WORLD_SIZE", per_node)
    nodes = _int(env, nodes_key, max(1, world // per_node))
    source = f"{size_key}={per_node}" + (f", {nodes_key}={nodes}" if nodes_key in env else "")
    return Topology(launcher, _int(env, "RANK", 0), _int(env, "LOCAL_RANK", 0), world, per_node, nodes,
                    _int(env, node_rank_key, 0), per_node * nodes == world, source)


def _from_slurm(env: Mapping[str, str]) -> Topology:
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if key in env:
            counts, source = parse_tasks_per_node(env[key], key), f"{key}={env[key]}"
            break
    else:
        nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        counts = [_int(env, "SLURM_NTASKS_PER_NODE", 1)] * nodes
        source = f"SLURM_NTASKS_PER_NODE={counts[0]}"
    node_rank = _int(env, "SLURM_NODEID", 0)
    if node_rank >= len(counts):
        raise ConfigError(f"SLURM_NODEID={node_rank} but {source} lists {len(counts)} node(s); a broken srun "
                          "environment: start the ranks with launch/train_slurm.sbatch")
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", sum(counts)))
    if world != sum(counts):
        raise ConfigError(f"SLURM_STEP_NUM_TASKS={world} but {source} adds up to {sum(counts)}; a broken srun "
                          "environment: start the ranks with launch/train_slurm.sbatch")
    return Topology("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID", 0), world, counts[node_rank],
                    len(counts), node_rank, len(set(counts)) == 1, source)


_TASKS = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def parse_tasks_per_node(text: str, key: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Slurm's compressed tasks-per-node list: ``4(x2),2`` -> [4, 4, 2]."""
    counts: list[int] = []
    for part in text.split(","):
        m = _TASKS.fullmatch(part.strip())
        if not m:
            raise ConfigError(f"{key}={text!r} is not Slurm's tasks-per-node form (e.g. 4(x2),2)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"{key} is not set; the launcher sets it (start the ranks with launch/*.sh)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not an integer; the launcher sets it") from None


def check_allocation(topo: Topology, env: Mapping[str, str] | None = None) -> None:
    """Under Slurm: the ranks fill the whole allocation -- never a silently smaller job -- in node blocks.

    The step must span every node of the job with consecutive ranks on each node, and the world size must equal
    ``NPT_DS_WORLD_SIZE`` where the batch script set it (the allocation's ranks)."""
    env = os.environ if env is None else env
    if topo.launcher != "slurm":
        return
    job_nodes = _int(env, "SLURM_JOB_NUM_NODES", topo.nodes)
    if topo.nodes != job_nodes:
        raise ConfigError(f"world size: the ranks span {topo.nodes} of the allocation's {job_nodes} nodes "
                          f"({topo.world} ranks); start them on every node (srun --nodes={job_nodes}, as "
                          "launch/train_slurm.sbatch does)")
    if topo.uniform and topo.rank != topo.node_rank * topo.per_node + topo.local_rank:
        raise ConfigError(f"rank {topo.rank} is local rank {topo.local_rank} of node {topo.node_rank}: srun placed "
                          f"the ranks round-robin (SLURM_DISTRIBUTION={env.get('SLURM_DISTRIBUTION', '?')}), but "
                          "hpz and DeepSpeed expect each node's ranks to be consecutive; use srun --distribution=block")
    expected = env.get("NPT_DS_WORLD_SIZE")
    if expected and int(expected) != topo.world:
        raise ConfigError(f"world size: {topo.world} rank(s) started but the allocation holds {expected} "
                          f"({topo.layout()}); start one rank per GPU (or per task) on every node")


def gpu_check(topo: Topology, visible: int, env: Mapping[str, str] | None = None) -> str | None:
    """One warning line when the ranks on this node and the GPUs it shows disagree, else None.

    ``visible`` is what this rank sees (``torch.cuda.device_count()``, after ``CUDA_VISIBLE_DEVICES``).  A rank
    that sees exactly one GPU while its node runs several ranks is bound per task (``--gpus-per-task=1``, or a
    per-rank ``CUDA_VISIBLE_DEVICES``); the node's count is then Slurm's ``SLURM_GPUS_ON_NODE`` when set."""
    env = os.environ if env is None else env
    if visible < 1:
        return None
    per_task = visible == 1 and topo.per_node > 1
    node_gpus = _int(env, "SLURM_GPUS_ON_NODE", 0) if per_task else visible
    if per_task and not node_gpus:
        return None  # bound one GPU per rank by hand: nothing more to compare
    if node_gpus == topo.per_node:
        return None
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    shown = f"{node_gpus} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None and not per_task else "")
    fix = ("some GPUs stay idle: start one rank per GPU" if node_gpus > topo.per_node
           else "ranks share GPUs: start at most one rank per GPU, or expose more (CUDA_VISIBLE_DEVICES, --gpus-per-node)")
    return (f"npt-ds: warning: {topo.per_node} rank(s) on this node ({topo.source}) but it shows {shown}; {fix}")


def cuda_device_index(topo: Topology, visible: int) -> int:
    """This rank's GPU among those it sees: its local rank, or 0 when it sees one (bound per task)."""
    if visible <= 1:
        return 0 if visible == 1 else topo.local_rank
    return topo.local_rank % visible
