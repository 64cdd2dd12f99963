"""Profile `Trainer.train_step` and count host syncs and collectives per step (run under the launcher).

    deepspeed --num_gpus 2 --module bench.sync_probe --config X.yaml --out probe.json

A host sync is any tensor -> Python scalar read (`.item()`, `bool(t)`, `float(t)`), which lands in
`aten::_local_scalar_dense`; on CPU it costs nothing, on a GPU it stalls the host until the device
catches up, so the count is what matters.  Each is attributed to the innermost npt_ds/deepspeed
frame of its Python stack.  Collectives are the c10d/gloo ops the profiler records.  Log steps
(`Trainer.log_train`, the documented `.item()` point) are not part of `train_step` and are excluded.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

COLLECTIVE = re.compile(r"all_?reduce|all_?gather|reduce_?scatter|broadcast|barrier|all_to_all", re.I)
SITE_KEYS = ("npt_ds/", "deepspeed/", "bench/", "transformers/")


def _site(event, depth: int = 2) -> str:
    """The innermost npt_ds/deepspeed/bench Python frames above a profiler op event."""
    frames, e = [], event.cpu_parent
    while e is not None:
        if getattr(e, "is_python_function", False) and any(k in e.name for k in SITE_KEYS):
            m = re.search(r"((?:npt_ds|deepspeed|bench|transformers)/[^()]*)\((\d+)\): (.*)", e.name)
            frames.append(f"{m.group(1)}:{m.group(2)} {m.group(3)}" if m else e.name)
            if len(frames) == depth:
                break
        e = e.cpu_parent
    return " < ".join(frames) if frames else "<outside npt_ds/deepspeed>"


def analyse(events, steps: int) -> dict:
    ops = [e for e in events if not getattr(e, "is_python_function", False)]
    syncs = [e for e in ops if e.name == "aten::_local_scalar_dense"]
    colls = [e for e in ops if e.name.startswith("c10d::") and COLLECTIVE.search(e.name)]
    comm_us = sum(e.cpu_time_total for e in colls)
    comm_bytes = 0
    for e in colls:
        shapes = [s for s in (e.input_shapes or []) if s]
        if shapes:
            numel = 1
            for dim in shapes[0]:
                numel *= dim
            comm_bytes += numel * 4
    py = Counter()
    for e in events:
        if getattr(e, "is_python_function", False) and "deepspeed/" in e.name:
            py[e.name.split("site-packages/")[-1]] += e.cpu_time_total
    top_ds = {k: round(v / 1e6 / steps, 4) for k, v in py.most_common(20)}
    return {"steps": steps, "syncs_per_step": len(syncs) / steps,
            "deepspeed_py_inclusive_s_per_step": top_ds,
            "collective_s_per_step": comm_us / 1e6 / steps,
            "collective_mb_per_step": comm_bytes / 2**20 / steps,
            "sync_sites": dict(Counter(_site(e) for e in syncs).most_common()),
            "collectives_per_step": {k: v / steps for k, v in Counter(e.name for e in colls).most_common()},
            "collective_sites": dict(Counter(f"{e.name} @ {_site(e, 1)}" for e in colls).most_common())}


def profiled(trainer, steps: int) -> tuple[dict, float]:
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
            trainer.step += 1
        wall = time.perf_counter() - t0
    return analyse(prof.events(), steps), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sync_probe")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = p.parse_args(argv)

    from npt_ds.config import load_config
    from npt_ds.parallel.groups import shm_buffer_path, shutdown_distributed
    from npt_ds.train.trainer import Trainer

    trainer = Trainer(load_config(args.config))
    try:
        for _ in range(args.warm):
            trainer.train_step()
            trainer.step += 1
        res, wall = profiled(trainer, args.steps)
        # the same steps with the recommended fused.py change (no position_ids to create_causal_mask)
        from .dist_worker import patch_no_mask_sync

        patch_no_mask_sync()
        trainer.train_step()
        trainer.step += 1
        patched, _ = profiled(trainer, args.steps)
        if trainer.rank == 0:
            res["with_no_mask_sync_patch"] = {k: patched[k] for k in ("syncs_per_step", "sync_sites")}
            res["world_size"] = trainer.world
            res["profiled_s_per_step"] = wall / args.steps
            res["zero_stage"] = trainer.ds_config["zero_optimization"].get("stage")
            # what the release below removes: DeepSpeed's CPU comm made every rank one (tests/test_bench.py)
            res["shm_buffer_before_release"] = shm_buffer_path(trainer.rank).exists()
            Path(args.out).write_text(json.dumps(res, indent=1))
    finally:
        trainer.close()
        shutdown_distributed()  # the process group and this rank's shm buffer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
