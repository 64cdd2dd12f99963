"""The checks ``launch/train_slurm.sbatch`` runs before it starts anything: the allocation's ranks (one per GPU,
or per task on CPU nodes), the run dir, and whether it must be on a filesystem every node shares.

    python -m npt_ds.parallel.slurm layout CONFIG.yaml [key.path=value ...]

prints shell assignments (``NODES``, ``RANKS_PER_NODE``, ``WORLD``, ``RUN_DIR``, ``NEEDS_SHARED``) for the batch
script to ``eval``, or one ``error:`` line and exit 2.  It reads the batch shell's ``SLURM_*`` variables; the ranks'
own view is :mod:`npt_ds.parallel.topology`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..config import ConfigError, load_config
from .topology import parse_tasks_per_node


@dataclass(frozen=True)
class Allocation:
    nodes: int
    ranks_per_node: int
    gpus_per_node: int  # 0 on CPU nodes

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


def allocation(env: Mapping[str, str]) -> Allocation:
    """The ranks this job's allocation holds: one per GPU on GPU nodes, one per task on CPU nodes."""
    if not env.get("SLURM_JOB_ID"):
        raise ConfigError("not inside a Slurm allocation; submit with: sbatch --nodes N --gpus-per-node G "
                          "launch/train_slurm.sbatch CONFIG [key=value ...]")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    gpus = gpus_per_node(env)
    if env.get("SLURM_NTASKS_PER_NODE"):
        tasks, asked = [int(env["SLURM_NTASKS_PER_NODE"])] * nodes, f"--ntasks-per-node={env['SLURM_NTASKS_PER_NODE']}"
    else:
        tasks = parse_tasks_per_node(env.get("SLURM_TASKS_PER_NODE") or "1")
        asked = f"SLURM_TASKS_PER_NODE={env.get('SLURM_TASKS_PER_NODE', '1')}"
    explicit = bool(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_NTASKS"))  # sbatch sets them only if asked
    if gpus:
        if explicit and tasks != [gpus] * nodes:
            raise ConfigError(f"tasks per node ({asked}) do not match the {gpus} GPU(s) each node exposes; npt-ds "
                              f"starts one rank per GPU: drop --ntasks/--ntasks-per-node or make it {gpus} per node")
        alloc = Allocation(nodes, gpus, gpus)
    else:
        if len(set(tasks)) != 1:
            raise ConfigError(f"the allocation has unequal tasks per node ({asked}); give --ntasks-per-node so "
                              "every node runs as many ranks")
        alloc = Allocation(nodes, tasks[0], 0)
    if env.get("SLURM_NTASKS") and int(env["SLURM_NTASKS"]) != alloc.world:
        raise ConfigError(f"world size: {alloc.nodes} node(s) x {alloc.ranks_per_node} = {alloc.world} rank(s) "
                          f"but the allocation holds SLURM_NTASKS={env['SLURM_NTASKS']} tasks; ask for whole nodes "
                          "(--nodes with --gpus-per-node or --ntasks-per-node)")
    return alloc


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs each node exposes: ``--gpus-per-node`` ([type:]count), else the batch node's ``SLURM_GPUS_ON_NODE``."""
    spec = env.get("SLURM_GPUS_PER_NODE") or ""
    try:
        if spec:
            return int(spec.split(",")[0].rsplit(":", 1)[-1])
        return int(env.get("SLURM_GPUS_ON_NODE") or 0)
    except ValueError:
        raise ConfigError(f"SLURM_GPUS_PER_NODE={spec!r}: expected [type:]count, e.g. h100:8") from None


def layout(config: str, overrides: list[str], env: Mapping[str, str]) -> dict[str, str]:
    cfg = load_config(config, overrides)  # a missing or bad CONFIG is one line here, before any srun
    alloc = allocation(env)
    shared = alloc.nodes > 1 and not cfg.checkpoint.node_local  # every rank writes its shards into RUN_DIR
    return {"NODES": str(alloc.nodes), "RANKS_PER_NODE": str(alloc.ranks_per_node), "WORLD": str(alloc.world),
            "GPUS_PER_NODE": str(alloc.gpus_per_node), "RUN_DIR": str(Path(cfg.logging.run_dir).absolute()),
            "NEEDS_SHARED": "1" if shared else "0"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npt_ds.parallel.slurm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layout", help="the allocation's layout as shell assignments")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        values = layout(args.config, args.overrides, os.environ)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
