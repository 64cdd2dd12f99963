"""What the trainer uses on this hardware: ``precision`` and ``frozen_base`` 'auto' resolved, with the reasons,
for the node layout the launcher gave (:mod:`npt_ds.parallel.topology`); and ``npt-ds resolve``, which prints all
of it with the final DeepSpeed config -- the first thing to run on a new cluster:

    npt-ds resolve configs/llama3_8b_multinode.yaml                       # inside a launch (srun, torchrun, ...)
    npt-ds resolve CONFIG --nodes 2 --gpus-per-node 8 --gpu-mem 80 --gpu-name H100   # on a login node
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from ..config import ConfigError, TrainConfig, load_config
from .devices import device_memory_gib, resolve_precision
from .ds_config import build_ds_config, template_zero_stage
from .topology import Topology, detect_topology, fixed_topology, gpu_check
from .zero import resolve_frozen_base


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float  # what one rank may use
    cuda: bool
    source: str  # where name and memory come from


@dataclasses.dataclass(frozen=True)
class Resolution:
    cfg: TrainConfig  # precision and frozen_base resolved
    topology: Topology
    device: Device
    precision_why: str
    frozen_base_why: str

    def notes(self) -> list[str]:
        d = self.cfg.deepspeed
        return [f"precision: {d.precision} ({self.precision_why})", f"frozen base: {d.frozen_base} ({self.frozen_base_why})"]


def this_device(topo: Topology, gpu_mem_gib: float | None = None, gpu_name: str | None = None) -> Device:
    """The device each rank computes on: the flags' GPU, this machine's GPU, or a CPU share of the RAM."""
    if gpu_name is not None and gpu_mem_gib is None:
        raise ConfigError(f"--gpu-name {gpu_name!r} needs --gpu-mem (its memory in GiB) too")
    if gpu_mem_gib is not None:
        if gpu_mem_gib <= 0:
            raise ConfigError("--gpu-mem must be > 0 (GiB per GPU)")
        return Device(gpu_name or "a GPU", float(gpu_mem_gib), True, "--gpu-mem/--gpu-name")
    if torch.cuda.is_available():
        return Device(torch.cuda.get_device_name(), device_memory_gib(topo.per_node), True, "this machine's GPU")
    return Device("CPU", device_memory_gib(topo.per_node), False,
                  f"this machine's RAM shared by {topo.per_node} rank(s)")


def resolve(cfg: TrainConfig, topo: Topology, device: Device) -> Resolution:
    named = device.name if device.source.startswith("--") else None
    precision, why_p = resolve_precision(cfg.deepspeed.precision, named)
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, precision=precision))
    stage = cfg.deepspeed.zero_stage if cfg.deepspeed.zero_stage is not None else template_zero_stage(cfg)
    mode, why_f = resolve_frozen_base(cfg, topo, stage, device.memory_gib, device.cuda)
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, frozen_base=mode))
    return Resolution(cfg, topo, device, why_p, why_f)


def resolve_hardware(cfg: TrainConfig, topo: Topology) -> tuple[TrainConfig, list[str]]:
    """`cfg` with precision / frozen_base 'auto' replaced by what this hardware gets, and one line on each."""
    res = resolve(cfg, topo, this_device(topo))
    return res.cfg, res.notes()


# ---------------------------------------------------------------- npt-ds resolve
def add_resolve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", help="run recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. deepspeed.frozen_base=hpz")
    p.add_argument("--nodes", type=int, help="nodes (with --gpus-per-node; default: what the launcher says, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="ranks (GPUs) per node, with --nodes")
    p.add_argument("--gpu-mem", type=float, help="GiB per GPU, for a machine without that GPU (e.g. a login node)")
    p.add_argument("--gpu-name", help="the GPU's name (with --gpu-mem), e.g. 'NVIDIA H100 80GB HBM3'")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the text")


def run_resolve(args: argparse.Namespace) -> int:
    """Print what the trainer would use here; 0, or 2 with one line (cli.main) on a bad config or flag."""
    if (args.nodes is None) != (args.gpus_per_node is None):
        raise ConfigError("--nodes and --gpus-per-node go together; give both (or neither: the launcher's layout)")
    cfg = load_config(args.config, args.overrides)
    topo = detect_topology() if args.nodes is None else fixed_topology(args.nodes, args.gpus_per_node)
    device = this_device(topo, args.gpu_mem, args.gpu_name)
    res = resolve(cfg, topo, device)
    ds = build_ds_config(res.cfg, topo.world, topo.hpz_partition_size)
    hpz = ds.get("zero_optimization", {}).get("zero_hpz_partition_size")
    warning = gpu_check(topo, torch.cuda.device_count()) if device.source == "this machine's GPU" else None
    if args.json:
        print(json.dumps({"config": args.config, "layout": dataclasses.asdict(topo), "device": dataclasses.asdict(device),
                          "precision": {"value": res.cfg.deepspeed.precision, "why": res.precision_why},
                          "frozen_base": {"mode": res.cfg.deepspeed.frozen_base, "why": res.frozen_base_why},
                          "hpz_partition_size": hpz, "warning": warning, "deepspeed_config": ds}, indent=2))
        return 0
    d = res.cfg.deepspeed
    lines = [f"npt-ds resolve: {args.config}",
             f"layout: {topo.layout()}",
             f"device: {device.name}, {device.memory_gib:.1f} GiB per rank ({device.source})",
             f"precision: {d.precision} ({res.precision_why})",
             f"frozen base: {d.frozen_base} ({res.frozen_base_why})",
             f"hpz partition size: {hpz if hpz else '- (frozen base is not hpz)'}"]
    lines += [warning] if warning else []
    print("\n".join(lines + ["deepspeed config:", json.dumps(ds, indent=2)]))
    return 0
