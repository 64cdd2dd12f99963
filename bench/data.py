"""Data benchmark: `npt-ds prepare` throughput, resume set-up time vs the step resumed at, the step's data wait.

* ``prepare``  -- the demo's training plays x3 through the SmolLM2 tokenizer with 1 and 2 worker processes
                  (tokens/s, worker start-up included, and wall time); both write the same shards.
* ``resume``   -- the time from a fresh PackedBatches + load_state_dict(cursor of step S) to its first batch,
                  for S = 10 and S = 5,000 (demo batch: 2 ranks x micro-batch 2): prepared data (O(1): ratio
                  <= 1.2) beside the streaming source, which replays and re-tokenises everything before S.
* ``train``    -- the demo recipe, one rank, `--data-steps` steps on prepared data and on the streaming source:
                  median `time/data_wait_frac` (target < 1 % on prepared data) and the checkpoint's portable
                  trainable-state gather (npt_ds/train/elastic.py) beside the whole save.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from .common import format_table, target

DEMO = Path(__file__).resolve().parent.parent / "configs" / "smollm2_demo.yaml"


def prepare_args(out: Path, workers: int, split: str = "train", source: list[str] | None = None) -> argparse.Namespace:
    return argparse.Namespace(source=source or ["shakespeare"], tokenizer="smollm2", out=str(out), split=split,
                              holdout="hamlet,tempest", text_key="text", hub_split="train",
                              hub_eval_split="validation", seq_len=None, workers=workers,
                              shard_tokens=1 << 27, progress=False)


def bench_prepare(root: Path, copies: int = 3) -> dict:
    """The training plays `copies` times over (a corpus large enough that worker start-up does not dominate)."""
    from npt_ds.data.sources import shakespeare_split
    from npt_ds.data.prepare import prepare

    plays = [str(p) for p in shakespeare_split(["hamlet", "tempest"])[0]] * copies
    runs = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        index = prepare(prepare_args(root / f"corpus-{workers}w", workers, source=plays))
        runs[f"{workers}w"] = {"tokens": index["tokens"], "tokens_per_s": round(index["tokens_per_s"]),
                               "wall_s": round(time.perf_counter() - t0, 2)}
    same = (root / "corpus-1w" / "shard-00000.npy").read_bytes() == (root / "corpus-2w" / "shard-00000.npy").read_bytes()
    prepare(prepare_args(root / "train-1w", 1))  # the demo's own training plays, for the resume and train sections
    return {**runs, "identical_shards": same, "corpus": f"the demo's training plays x{copies}"}


def first_batch_s(data_cfg, tokenizer, cursor: int, world: int = 2, repeats: int = 3) -> float:
    from npt_ds.data.sources import PackedBatches

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        batches = PackedBatches(data_cfg, tokenizer, rank=0, world_size=world, seed=0)
        batches.load_state_dict({"cursor": cursor})
        next(batches)
        best = min(best, time.perf_counter() - t0)
        batches.close()
    return best


def bench_resume(root: Path, steps: tuple[int, int] = (10, 5000)) -> dict:
    import dataclasses

    from npt_ds.config import load_config
    from npt_ds.model import load_tokenizer

    cfg = load_config(DEMO, [])
    tokenizer = load_tokenizer(cfg.model)
    per_step = 2 * cfg.data.micro_batch_size * cfg.optim.grad_accum  # the demo's 2 ranks
    prepared = dataclasses.replace(cfg.data, source="prepared", path=str(root / "train-1w"), prefetch=0)
    streaming = dataclasses.replace(cfg.data, prefetch=0)
    out = {}
    for name, data, repeats in (("prepared", prepared, 9), ("streaming", streaming, 1)):
        out[name] = {f"step_{s}_s": round(first_batch_s(data, tokenizer, s * per_step, repeats=repeats), 5)
                     for s in steps}
        out[name]["ratio"] = round(out[name][f"step_{steps[1]}_s"] / out[name][f"step_{steps[0]}_s"], 3)
    return out


def bench_train(root: Path, steps: int) -> dict:
    from npt_ds.config import load_config
    from npt_ds.train.elastic import save_portable_state
    from npt_ds.data.prepare import prepare
    from npt_ds.parallel.groups import shutdown_distributed
    from npt_ds.train.trainer import Trainer

    prepare(prepare_args(root / "eval", 1, split="eval"))
    out = {}
    for name, overrides in (("prepared", ["data.source=prepared", f"data.path={root / 'train-1w'}",
                                          f"data.eval_path={root / 'eval'}"]), ("streaming", [])):
        run_dir = root / f"run-{name}"
        cfg = load_config(DEMO, [f"logging.run_dir={run_dir}", f"schedule.total_steps={steps}", "logging.eval_every=0",
                                 "checkpoint.every=0", "checkpoint.save_final=false", "logging.console=false",
                                 "data.eval_batches=1", "checkpoint.resume=none", *overrides])
        trainer = Trainer(cfg)
        trainer.train()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        waits = [r["time/data_wait_frac"] for r in rows if r.get("event") == "train"][2:]  # after warm-up
        out[name] = {"data_wait_frac_median": statistics.median(waits), "data_wait_frac_max": max(waits),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows if r.get("event") == "train")}
        if name == "prepared":
            t0 = time.perf_counter()
            trainer.save()
            out["save_s"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            save_portable_state(trainer.engine, root, write=True)
            out["portable_state_s"] = round(time.perf_counter() - t0, 3)
            out["portable_state_mb"] = round((root / "portable.pt").stat().st_size / 1e6, 2)
        trainer.close()
    shutdown_distributed()  # this process's group and its shm buffer (DeepSpeed's CPU comm)
    return out


def run_data(opts) -> dict:
    with tempfile.TemporaryDirectory(prefix="npt-bench-data-") as tmp:
        root = Path(tmp)
        res = {"prepare": bench_prepare(root), "resume": bench_resume(root), "train": bench_train(root, opts.data_steps)}
    p, r, t = res["prepare"], res["resume"], res["train"]
    res["targets"] = {
        "prepare_2w_vs_1w": target(p["2w"]["tokens_per_s"] / p["1w"]["tokens_per_s"], None, ">=",
                                   "prepare tokens/s, 2 workers / 1 worker (2 cores)"),
        "resume_setup_ratio": target(r["prepared"]["ratio"], 1.2, "<=",
                                     "prepared data: first batch after resuming at step 5000 / at step 10"),
        "streaming_replay_ratio": target(r["streaming"]["ratio"], None, "<=",
                                         "streaming source: the same ratio (replay grows with the step)"),
        "data_wait_frac": target(t["prepared"]["data_wait_frac_median"], 0.01, "<=",
                                 "demo step on prepared data: median share of step time waiting for data"),
    }
    return res


def print_data(res: dict) -> str:
    p, r, t = res["prepare"], res["resume"], res["train"]
    rows = [{"what": f"prepare, {w}", "value": f"{p[w]['tokens_per_s']:,} tok/s ({p[w]['wall_s']} s)"} for w in ("1w", "2w")]
    rows.append({"what": "prepare, identical shards", "value": str(p["identical_shards"])})
    for name in ("prepared", "streaming"):
        v = r[name]
        rows.append({"what": f"resume set-up, {name}", "value": f"step 10 {v['step_10_s']:.4f} s, step 5000 "
                                                                 f"{v['step_5000_s']:.4f} s (x{v['ratio']})"})
        rows.append({"what": f"demo step data wait, {name}",
                     "value": f"median {100 * t[name]['data_wait_frac_median']:.3f} %, max "
                              f"{100 * t[name]['data_wait_frac_max']:.3f} %, {t[name]['tokens_per_s']:.0f} tok/s"})
    rows.append({"what": "checkpoint save / of it the portable state",
                 "value": f"{t['save_s']} s / {t['portable_state_s']} s ({t['portable_state_mb']} MB)"})
    return format_table(rows, [("what", "what", ""), ("value", "value", "")], title="data")
