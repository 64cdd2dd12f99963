"""Elastic resume: a checkpoint written on N ranks continues on M ranks with the same global batch.

The data order is world-size independent already (npt_ds/data/sources.py's global cursor); what remains is the
optimizer state and the batch shape.

DeepSpeed's own checkpoint holds per-rank ZeRO shards of the fp32 masters and Adam moments: it loads only on
the world size that wrote it.  Each save therefore also writes the trainable state in a portable form: per
trainable parameter the fp32 master and Adam's `exp_avg` / `exp_avg_sq`, plus each param group's Adam step count.
The frozen base is never part of it.

* ZeRO-3 (``portable/``, torch.distributed.checkpoint): every rank writes its own partition of each tensor, as a
  1-D DTensor sharded like ZeRO-3's flat partitions (rank r holds elements [r·⌈N/W⌉, (r+1)·⌈N/W⌉)), straight from
  the optimizer's buffers; on load DCP reads, on any world size, each rank's new partition from whichever files
  hold it.  A rank's host memory stays O(trainable / world + the largest tensor) while saving and loading.
* ZeRO-1/2 (``portable.pt``): the full tensors are gathered one parameter at a time (`safe_get_full_*`); only the
  writing rank keeps them, and every rank reads the file back on load.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_get_local_fp32_param,
                             safe_get_local_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state,
                             safe_set_local_fp32_param, safe_set_local_optimizer_state)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from ..config import ConfigError, TrainConfig
from ..parallel.groups import compute_device
from ..parallel.zero import gathered
from .optim import _state_keys

FILE = "portable.pt"  # ZeRO-1/2
SHARDED = "portable"  # ZeRO-3: a torch.distributed.checkpoint dir
MOMENTS = ("exp_avg", "exp_avg_sq")
STATES = (None, *MOMENTS)  # None: the fp32 master


def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _full(param, key: str | None) -> torch.Tensor:
    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:
        raise RuntimeError(f"portable state: no ZeRO-managed {key or 'fp32 master'} for a trainable parameter; "
                           "elastic resume needs ZeRO stage 1-3 and an Adam-type optimizer")
    return value.detach().float().cpu().clone()


def group_steps(engine) -> list[float]:
    """Adam's step count of each param group (0 before the first step)."""
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    steps = []
    for i in range(len(base.param_groups)):
        found = [base.state[k]["step"] for k in _state_keys(optimizer, base, i) if "step" in base.state.get(k, {})]
        steps.append(float(found[0]) if found else 0.0)
    return steps


def set_group_steps(engine, steps: list[float]) -> None:
    """Give each param group's Adam state the saved step count, creating the (lazily built) state first.

    A fresh engine has no Adam state before its first step; it is made here as Adam would make it (zero
    moments; the step a float tensor for torch's Adam, an int for DeepSpeed's fused / CPU Adam)."""
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    torch_adam = type(base).__module__.startswith("torch.optim")
    for i, step in enumerate(steps[:len(base.param_groups)]):
        for key in _state_keys(optimizer, base, i):
            state = base.state[key]
            if not state:
                state.update({"step": torch.tensor(0.0) if torch_adam else 0,
                              **{m: torch.zeros_like(key, memory_format=torch.preserve_format) for m in MOMENTS}})
            old = state["step"]
            state["step"] = torch.full_like(old, step) if torch.is_tensor(old) else type(old)(step)


def zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def save_portable_state(engine, out_dir: Path, write: bool) -> None:
    """Write the portable trainable state into out_dir (collective: every rank calls it): ZeRO-3 each rank its own
    shards (``portable/``); ZeRO-1/2 the rank with `write` (one per copy) the gathered ``portable.pt``."""
    if zero3(engine):
        steps = torch.tensor(group_steps(engine), dtype=torch.float64)  # the same on every rank: written once
        dcp.save({**_sharded_states(engine), "group_steps": steps}, checkpoint_id=Path(out_dir) / SHARDED)
        return
    state = {}
    for name, p in trainable(engine):  # one parameter at a time; the other ranks drop their copies at once
        full = {"fp32": _full(p, None), **{k: _full(p, k) for k in MOMENTS}}
        if write:
            state[name] = full
    if write:
        torch.save({"params": state, "group_steps": group_steps(engine), "version": 1}, Path(out_dir) / FILE)


def _key(name: str, state: str | None) -> str:
    return f"{name}/{state or 'fp32'}"


def _sharded_states(engine, fill: bool = True) -> dict[str, DTensor]:
    """Every trainable tensor's fp32 master and moments as 1-D DTensors over the ranks, this rank's part being its
    ZeRO-3 partition without the padding: views of the optimizer's buffers (`fill`), or empty tensors to load into."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(compute_device().type, (world,))
    out = {}
    for name, p in trainable(engine):
        numel, part = p.ds_numel, p.ds_tensor.numel()  # ZeRO-3 pads every partition to ceil(numel / world)
        mine = max(0, min(part, numel - rank * part))
        for state in STATES:
            if fill:
                local = (safe_get_local_fp32_param(p) if state is None else safe_get_local_optimizer_state(p, state))
                local = local.detach().reshape(-1)[:mine]
            else:
                local = torch.empty(mine, dtype=torch.float32, device=compute_device())
            out[_key(name, state)] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                        shape=torch.Size([numel]), stride=(1,))
    return out


@torch.no_grad()
def _load_sharded(engine, src: Path) -> None:
    """ZeRO-3: each rank reads its own partitions (any world size wrote them), sets the optimizer's masters and
    moments, and the module's low-precision copy one parameter at a time (the largest tensor bounds the gather)."""
    states = _sharded_states(engine, fill=False)
    steps = torch.zeros(len(group_steps(engine)), dtype=torch.float64)
    dcp.load({**states, "group_steps": steps}, checkpoint_id=src)
    set_group_steps(engine, steps.tolist())  # creates Adam's state where the engine has none yet
    world = dist.get_world_size()
    for name, p in trainable(engine):
        part = p.ds_tensor.numel()
        for state in STATES:
            local = states[_key(name, state)].to_local()
            padded = torch.zeros(part, dtype=torch.float32, device=local.device)
            padded[: local.numel()] = local
            if state is None:
                safe_set_local_fp32_param(p, padded)
                pieces = [torch.empty_like(padded) for _ in range(world)]
                dist.all_gather(pieces, padded)
                with gathered([p]):  # the module's (partitioned or persistent) low-precision weight
                    p.data.copy_(torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).to(p.dtype))
                del pieces
            else:
                safe_set_local_optimizer_state(p, padded, state)


@torch.no_grad()
def load_portable_state(engine, src_dir: Path) -> None:
    """Restore masters, moments and step counts from the portable state in src_dir into an engine of any world
    size (ZeRO-3's sharded ``portable/`` or ZeRO-1/2's ``portable.pt``)."""
    sharded = Path(src_dir) / SHARDED
    if (sharded / ".metadata").is_file():
        if not zero3(engine):
            raise ConfigError(f"checkpoint.resume: {src_dir} holds ZeRO-3's sharded portable state; resume it with "
                              "deepspeed.zero_stage: 3")
        _load_sharded(engine, sharded)
        return
    file = Path(src_dir) / FILE
    if not file.is_file():
        raise ConfigError(f"checkpoint.resume: {src_dir} has no {FILE} or {SHARDED}/ (the trainable state in a "
                          "world-size-independent form); resume it on the world size that wrote it, or (node-local) "
                          "gather every node's step dir into one")
    saved = torch.load(file, map_location="cpu", weights_only=False)
    params = trainable(engine)
    missing = sorted({n for n, _ in params} - set(saved["params"]))
    if missing:
        raise ConfigError(f"checkpoint.resume: {file} lacks trainable params {missing[:3]}...; the npt / model "
                          "config differs from the run that wrote it")
    set_group_steps(engine, saved["group_steps"])  # creates Adam's state where the engine has none yet
    device = engine.device
    for name, p in params:  # the module's own (partitioned) low-precision copy, one parameter at a time
        with gathered([p]):
            p.data.copy_(saved["params"][name]["fp32"].view(getattr(p, "ds_shape", p.shape)).to(p.dtype))
    for name, p in params:
        entry = saved["params"][name]
        safe_set_full_fp32_param(p, entry["fp32"].to(device))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, entry[key].to(device), key)


def keep_global_batch(cfg: TrainConfig, meta: dict, world: int) -> tuple[TrainConfig, str | None]:
    """`cfg` with optim.grad_accum set so that world x micro-batch x accumulation equals the saved run's global
    batch when the world size changed (and a note saying so); a one-line error when no integer value does."""
    saved_world = int(meta.get("world_size", world))
    saved = meta.get("config", {})
    if saved_world == world or "data" not in saved:
        return cfg, None
    mb0, ga0 = int(saved["data"]["micro_batch_size"]), int(saved["optim"]["grad_accum"])
    target = mb0 * ga0 * saved_world
    mb, ga = cfg.data.micro_batch_size, cfg.optim.grad_accum
    if mb * ga * world == target:
        return cfg, None
    if target % (mb * world):
        fits = [d for d in range(1, target // world + 1) if target % (d * world) == 0] if target % world == 0 else []
        fix = (f"set data.micro_batch_size to one of {fits}" if fits else
               f"resume on a number of ranks that divides {target}")
        raise ConfigError(f"checkpoint.resume: the run was written with a global batch of {target} windows "
                          f"({saved_world} ranks x data.micro_batch_size {mb0} x optim.grad_accum {ga0}); "
                          f"{world} ranks x micro-batch {mb} cannot make it; {fix}")
    accum = target // (mb * world)
    note = (f"resharded {saved_world} -> {world} ranks: optim.grad_accum {ga} -> {accum} keeps the global batch "
            f"at {target} windows")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=accum)), note
