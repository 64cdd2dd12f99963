"""Checkpoints: RUN_DIR/checkpoints/step-{N:08d}/ with DeepSpeed state (frozen base excluded),
portable NP weights, portable.pt (the trainable state in a world-size-independent form, see npt_ds/train/elastic.py),
meta.json (config, loop state, global data cursor) and per-rank RNG state.

A step dir is written under a temp name and renamed into place; the `latest` pointer is written
last, atomically (temp file + rename), so an interrupted save never becomes the resume point; only
the `keep_last` most recently written step dirs are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..model.io import save_np_weights
from ..parallel.groups import any_rank_flags, barrier, local_rank
from .elastic import load_portable_state, save_portable_state

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"  # in-progress saves and replaced step dirs (never matched by STEP_DIR)


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():  # this rank's current GPU (dropout, sampling on device)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, meta: dict, rank: int, keep_last: int,
                    before_publish=None, node_local: bool = False) -> Path:
    """Write step-{N:08d}/ (collective: every rank calls it) and point `latest` at it.

    Everything is written into a temp dir that is renamed into place once complete, so neither a killed
    save nor a re-save of an existing step (re-running a finished run) leaves a half-written step dir.
    Then the step dirs beyond the newest `keep_last` *in write order* are pruned, never the one just
    written (after a resume from an earlier step, the highest step number is not the newest).

    One rank does the bookkeeping (meta, NP weights, portable state, rename, `latest`, pruning): rank 0 on a
    shared filesystem; with `node_local` each node's local rank 0 on that node's own disk, which also holds
    the DeepSpeed shards of that node's ranks (DeepSpeed's use_node_local_storage).
    """
    root = Path(root)
    leader = local_rank() == 0 if node_local else rank == 0
    tag = step_tag(step)
    tmp = root / f"{TMP_PREFIX}{tag}"
    if leader:  # leftovers of a save that was killed
        for stale in root.glob(f"{TMP_PREFIX}*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"npt_meta": meta}, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    save_np_weights(engine.module.model, tmp / "np", write=leader, per_layer=True)  # collective: per-layer gathers
    save_portable_state(engine, tmp, write=leader)  # collective
    if before_publish is not None:  # a test's fault hook: the shards are written, nothing is published yet
        before_publish()
    barrier()
    target = root / tag
    if leader:
        (tmp / "meta.json").write_text(json.dumps({**meta, "saved_at_ns": time.time_ns()}, indent=2, default=str))
        replaced = root / f"{TMP_PREFIX}old-{tag}"
        if target.exists():
            os.replace(target, replaced)
        os.replace(tmp, target)
        latest = root / f"{TMP_PREFIX}latest{os.getpid()}"
        latest.write_text(tag)
        os.replace(latest, root / "latest")
        shutil.rmtree(replaced, ignore_errors=True)
        prune(root, keep_last, keep=tag)
    barrier()
    return target


def written_at(step_dir: Path) -> int:
    """When a step dir was saved (ns): meta.json's `saved_at_ns`, else its modification time."""
    meta = step_dir / "meta.json"
    try:
        return int(json.loads(meta.read_text())["saved_at_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        return (meta if meta.exists() else step_dir).stat().st_mtime_ns


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the `keep_last` most recently written step dirs; `keep` (a tag) always stays."""
    if keep_last <= 0:
        return
    by_age = sorted(list_steps(root), key=lambda s: (written_at(root / step_tag(s)), s))
    for old in by_age[:-keep_last]:
        if step_tag(old) != keep:
            shutil.rmtree(root / step_tag(old), ignore_errors=True)


def read_meta(target: Path) -> dict:
    """meta.json of a step dir (loop state, config, world size)."""
    return json.loads((Path(target) / "meta.json").read_text())


def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def latest_step_dir(root: Path) -> Path | None:
    """The step dir `latest` names (what `resume: auto` continues from; after a resume from an earlier step it
    is not the highest step dir), or None when there is none."""
    latest = Path(root) / "latest"
    if not latest.is_file():
        return None
    target = Path(root) / latest.read_text().strip()
    return target if target.is_dir() else None


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


def resume_disagreement(views: list[dict]) -> str | None:
    """None when every rank resumes from the same step; else one line naming each node and the step it sees (or
    its error).  `views`: per rank {"rank", "host", "step" (None: no checkpoint)} or {"rank", "host", "error"}."""
    errors = [v for v in views if "error" in v]
    if errors:
        return errors[0]["error"]
    if len({v["step"] for v in views}) <= 1:
        return None
    nodes: dict[tuple[str, int | None], list[int]] = {}
    for v in views:
        nodes.setdefault((v["host"], v["step"]), []).append(v["rank"])
    seen = "; ".join(f"{host} (rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}): "
                     f"{step_tag(step) if step is not None else 'no checkpoint'}" for (host, step), ranks in nodes.items())
    return (f"checkpoint.resume: the nodes do not agree on the step to resume ({seen}); with checkpoint.node_local "
            "give every node the same step dirs and `latest` (README: Storage), or set checkpoint.resume: none "
            "and a new logging.run_dir")


def own_shard_present(target: Path, rank: int) -> bool:
    """Whether DeepSpeed's optimizer shard of `rank` is in the step dir (ZeRO-0 keeps it in the model states)."""
    return any(target.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt")) or \
        not any(target.glob("*_optim_states.pt")) and (target / "mp_rank_00_model_states.pt").is_file()


def load_checkpoint(engine, target: Path, rank: int, world: int) -> dict:
    """Restore a step dir: DeepSpeed's native shards when `world` is the size that wrote it and every rank finds
    its own shard there, else the portable trainable state (elastic resume, or node-local step dirs gathered from
    other nodes).  Returns the saved loop state (meta)."""
    meta = read_meta(target)
    native = int(meta.get("world_size", world)) == world and own_shard_present(target, rank)
    if not any_rank_flags(torch.tensor([0.0 if native else 1.0]))[0]:  # every rank the same way
        _, client = engine.load_checkpoint(str(target.parent), tag=target.name, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        meta = client["npt_meta"]
    else:
        load_portable_state(engine, target)
    rng = target / f"rng_rank{rank}.pt"
    if rng.is_file():  # a rank the writing run did not have keeps its seeded state
        set_rng_state(torch.load(rng, weights_only=False))
    return meta
