"""One process (rank) of the checkpoint benchmark (bench/ckpt.py): the trainer's own save and load, measured.

    python -m bench.ckpt_worker --config RECIPE --phase save --out DIR         # (or under `deepspeed --num_gpus N`)
    python -m bench.ckpt_worker --config RECIPE --phase load --target STEP_DIR --out DIR
    python -m bench.ckpt_worker --phase preempt --shape llama-3.1-8b --layers 16-31 --rank-np 256 --k 4 --dual --out DIR

save: one training step (Adam's state exists), then `Trainer.save()`; load: a fresh trainer, then `load_checkpoint`
(DeepSpeed's shards on the world size that wrote them, else the portable state).  A thread samples this process's
RSS high-water mark; each rank writes DIR/<phase>-rank<r>.json with the RSS before and the peak during the operation.
preempt: the engine of an 8B-scale NPT built from what a checkpoint holds (the NP components of the converted
layers only: the frozen base is never saved), Adam's state made, then SIGTERM to itself, the trainer's checkpoint
save and a clean exit; rank 0 writes when the signal went out, the parent times the process's end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import deepspeed
import torch
from transformers import LlamaConfig

from npt_ds.config import NPTConfig, load_config, parse_layer_spec
from npt_ds.model.np_component import NPComponent
from npt_ds.parallel.groups import init_distributed, shutdown_distributed
from npt_ds.planning.shape import SHAPES_DIR
from npt_ds.train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from npt_ds.train.elastic import group_steps, set_group_steps
from npt_ds.train.faults import PreemptionFlag
from npt_ds.train.trainer import Trainer

from .common import peak_rss_mb, reset_peak_rss, rss_mb

MIB_GB = 2**20 / 1e9


class PeakRSS:
    """This process's RSS before the context and its peak while it runs (GB): the kernel's high-water mark, reset
    on entry (bench.common; where it cannot be reset, the process's lifetime peak)."""

    def __enter__(self) -> "PeakRSS":
        self.before = rss_mb() * MIB_GB
        reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.before, peak_rss_mb() * MIB_GB)


def trainer_phase(args) -> dict:
    cfg = load_config(args.config, [*args.set, f"logging.run_dir={Path(args.out) / 'run'}", "checkpoint.resume=none",
                                    "logging.console=false", "distributed.heartbeat_timeout_s=0"])
    trainer = Trainer(cfg)
    try:
        if args.phase == "save":
            trainer.train_step()
            trainer.step = 1
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                path = trainer.save()
                seconds = time.perf_counter() - t0
            extra = {"path": str(path)}
        else:
            target = Path(args.target)
            kind = "native" if int(read_meta(target)["world_size"]) == trainer.world else "portable"
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                load_checkpoint(trainer.engine, target, trainer.rank, trainer.world)
                seconds = time.perf_counter() - t0
            extra = {"kind": kind}
        return {"rank": trainer.rank, "world": trainer.world, "rss_before_gb": round(rss.before, 3),
                "rss_peak_gb": round(rss.peak, 3), "seconds": round(seconds, 3),
                "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.module.parameters()
                                        if p.requires_grad), **extra}
    finally:
        trainer.close()


def np_only_model(shape_name: str, layers: list[int], rank: int, k: int, dual: bool):
    """What an NPT checkpoint holds of a model: the NP components of its converted layers, at their names
    (model.layers.<i>.np.*), with the conversion spec and the base's config that npt_spec.json records."""
    config = LlamaConfig(**json.loads((SHAPES_DIR / f"{shape_name}.json").read_text()))
    holders = torch.nn.ModuleDict()
    for i in layers:
        holder = torch.nn.Module()
        holder.np = NPComponent(config.hidden_size, config.intermediate_size, rank, k, dual=dual)
        holders[str(i)] = holder
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = holders
    model.config = config
    model.npt_config = NPTConfig(layers=",".join(map(str, layers)), rank=rank, num_ranks=k, dual=dual)
    model.npt_layer_indices = list(layers)
    return model


def preempt_phase(args) -> dict:
    rank, world = init_distributed()
    layers = parse_layer_spec(args.layers, 10**6)
    model = np_only_model(args.shape, layers, args.rank_np, args.k, args.dual)
    holder = torch.nn.Module()
    holder.model = model
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": 3}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=holder, model_parameters=[p for p in holder.parameters()], config=ds)
    set_group_steps(engine, [1.0] * len(group_steps(engine)))  # Adam's moments exist, as after a step
    trainable = sum(p.ds_numel for p in holder.parameters())
    flag = PreemptionFlag()
    out = Path(args.out)
    if rank == 0:
        (out / "signal.json").write_text(json.dumps({"time": time.time(), "trainable_params": trainable}))
    os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; the trainer saves at the next step boundary
    while not flag.set:
        time.sleep(0.001)
    t0 = time.perf_counter()
    path = save_checkpoint(engine, out / "checkpoints", 1, {"step": 1, "world_size": world}, rank, keep_last=1)
    seconds = time.perf_counter() - t0
    shutdown_distributed()
    return {"rank": rank, "world": world, "save_s": round(seconds, 3), "trainable_params": trainable,
            "path": str(path), "bytes_on_disk": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.ckpt_worker")
    p.add_argument("--config")
    p.add_argument("--phase", required=True, choices=["save", "load", "preempt"])
    p.add_argument("--target")
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides (key.path=value)")
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--layers", default="16-31")
    p.add_argument("--rank-np", type=int, default=256)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dual", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    result = preempt_phase(args) if args.phase == "preempt" else trainer_phase(args)
    Path(args.out, f"{args.phase}-rank{result['rank']}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
