"""Checkpoints: RUN_DIR/checkpoints/step-{N:08d}/ with DeepSpeed state (frozen base excluded),
portable NP weights, meta.json (config, loop state, data position) and per-rank RNG state.

The `latest` pointer is written last, atomically (temp file + rename), so an interrupted save
never becomes the resume point; only the newest `keep_last` step dirs are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .distributed import barrier
from .model.io import save_np_weights

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(engine, root: Path, step: int, meta: dict, rank: int, keep_last: int) -> Path:
    tag = step_tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"npt_meta": meta}, save_latest=False,
                           exclude_frozen_parameters=True)
    target = root / tag
    torch.save(rng_state(), target / f"rng_rank{rank}.pt")
    save_np_weights(engine.module.model, target / "np")  # collective under ZeRO-3 (gathers)
    barrier()
    if rank == 0:
        (target / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        tmp = root / f".latest.tmp{os.getpid()}"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        for old in list_steps(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(root / step_tag(old), ignore_errors=True)
    barrier()
    return target


def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def resolve_resume(root: Path, resume: str) -> Path | None:
    """`auto` -> the dir named by `latest` (None if there is none); `none` -> None; else a step dir."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = root / "latest"
        if not latest.is_file():
            return None
        target = root / latest.read_text().strip()
        if not (target / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume: {latest} points at {target.name}, which has no meta.json; "
                                    "set checkpoint.resume to an intact step dir or 'none'")
        return target
    target = Path(resume)
    if not (target / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint.resume: {resume!r} is not a checkpoint dir (no meta.json); "
                                "give RUN_DIR/checkpoints/step-XXXXXXXX, 'auto' or 'none'")
    return target


def load_checkpoint(engine, target: Path, rank: int) -> dict:
    _, client = engine.load_checkpoint(str(target.parent), tag=target.name, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
    rng = target / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return client["npt_meta"]
