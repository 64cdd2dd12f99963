"""Thin training entry point: parse -> build -> train -> close.

    npt-ds train configs/smollm2_demo.yaml [key.path=value ...]
    deepspeed --num_gpus 2 -m npt_ds.train --config configs/smollm2_demo.yaml [key.path=value ...]
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch.distributed as dist

from ..config import ConfigError, load_config
from ..parallel.cluster import load_sealed_env
from ..parallel.groups import exit_now, shutdown_distributed
from .faults import SurvivingOutput
from .trainer import Trainer, TrainingDiverged


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config_path", nargs="?", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--config", dest="config_flag", help="YAML recipe (form used by the deepspeed launcher)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. schedule.total_steps=50")


def run_train(args: argparse.Namespace) -> int:
    path, overrides = args.config_path, list(args.overrides)
    if args.config_flag:  # --config given: every positional is an override
        if path:
            overrides.insert(0, path)
        path = args.config_flag
    elif path and "=" in path and not path.endswith((".yaml", ".yml")):  # overrides only, no recipe
        overrides.insert(0, path)
        path = None
    try:
        SurvivingOutput.install()  # a preempted rank whose launcher's pipes close still saves (npt_ds.train.faults)
        load_sealed_env()  # secrets a multi-node launch keeps off command lines (npt_ds.parallel.cluster)
        cfg = load_config(path, overrides)
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"npt-ds train: {exc}", file=sys.stderr)
        if dist.is_initialized() and dist.get_world_size() > 1:  # each rank stops on its own: the teardown of
            exit_now(2)  # a group with peers could abort (exit_now); a world of one returns to its caller
        return 2
    try:
        trainer.train()
    except TrainingDiverged as exc:
        trainer.close()
        shutdown_distributed()
        print(f"\nnpt-ds train: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:
        missing = trainer.lost_peers(exc)
        if missing is None:  # this rank's own failure (its peers still beat): the traceback says what
            if not (dist.is_initialized() and dist.get_world_size() > 1):
                raise
            trainer.metrics.close()
            traceback.print_exc()  # and exit 1 without the interpreter's teardown of a group whose peers still
            exit_now(1)  # wait in a collective for this rank: that teardown can abort the process (-6, exit 250)
        print(f"\nnpt-ds train: {trainer.abort(exc, missing)}", file=sys.stderr)
        exit_now(4)  # the process group is broken: its teardown (and the interpreter's) could wait on the lost peer
    trainer.close()
    shutdown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npt_ds.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
