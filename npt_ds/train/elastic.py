"""Elastic resume: a checkpoint written on N ranks continues on M ranks with the same global batch.

The data order is world-size independent already (npt_ds/data/sources.py's global cursor); what remains is the
optimizer state and the batch shape.

DeepSpeed's own checkpoint holds per-rank ZeRO shards of the fp32 masters and Adam moments: it loads only on
the world size that wrote it.  The NP components (and a cross-width projector) are small, so each save also
gathers, per trainable parameter, the full fp32 master and Adam's `exp_avg` / `exp_avg_sq` through
`deepspeed.utils.safe_get_full_*` (ZeRO-1/2/3 alike), plus each param group's Adam step count, into
`portable.pt` (rank 0 writes it).  `load_portable_state` scatters them back into an engine of any world size
with `safe_set_full_*` and copies the masters into the module's (partitioned) low-precision weights.
The frozen base is never part of it.
"""
from __future__ import annotations

from pathlib import Path

import dataclasses

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

from ..config import ConfigError, TrainConfig
from ..parallel.zero import gathered
from .optim import _state_keys

FILE = "portable.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


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


def save_portable_state(engine, out_dir: Path, write: bool) -> None:
    """Gather (collective: every rank calls it) and write out_dir/portable.pt where `write` (one rank per copy)."""
    state = {}
    for name, p in trainable(engine):
        state[name] = {"fp32": _full(p, None), **{k: _full(p, k) for k in MOMENTS}}
    if write:
        torch.save({"params": state, "group_steps": group_steps(engine), "version": 1}, Path(out_dir) / FILE)


@torch.no_grad()
def load_portable_state(engine, src_dir: Path) -> None:
    """Restore masters, moments and step counts from src_dir/portable.pt into an engine of any world size."""
    file = Path(src_dir) / FILE
    if not file.is_file():
        raise ConfigError(f"checkpoint.resume: {src_dir} has no {FILE} (written before elastic resume existed); "
                          "resume it on the world size that wrote it")
    saved = torch.load(file, map_location="cpu", weights_only=False)
    params = trainable(engine)
    missing = sorted({n for n, _ in params} - set(saved["params"]))
    if missing:
        raise ConfigError(f"checkpoint.resume: {file} lacks trainable params {missing[:3]}...; the npt / model "
                          "config differs from the run that wrote it")
    set_group_steps(engine, saved["group_steps"])  # creates Adam's state where the engine has none yet
    device = engine.device
    with gathered([p for _, p in params]):  # the module's own (partitioned) low-precision copy
        for name, p in params:
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
