"""`npt-ds` command line: one table from command name to the functions that parse and run it.

    npt-ds prepare shakespeare --tokenizer smollm2 --out data/prepared/shakespeare
    npt-ds train configs/smollm2_demo.yaml [key.path=value ...]
    npt-ds convert --layers upper_half --out runs/np-init
    npt-ds eval [--np runs/demo/checkpoints/step-00000200/np] [--layers upper_half]
    npt-ds eval --np NP_DIR --data data/prepared/shakespeare-eval --batches 64 [--bootstrap 2000]
    npt-ds sweep sweeps/demo_ablation.yaml [--dry-run]
    npt-ds plan configs/llama3_8b_multinode.yaml --nodes 2 --gpus-per-node 8 --gpu-mem 80
    npt-ds resolve configs/llama3_8b_multinode.yaml [key=value ...] [--nodes 2 --gpus-per-node 8 --gpu-mem 80 --gpu-name H100]
    npt-ds generate --np NP_DIR --prompt "To be, or not" [--temperature 0.8 --top-p 0.9]
    npt-ds export --np NP_DIR --out HF_DIR
    npt-ds inject --np NP_DIR --context TEXT [--layers 26,27] [--positions last] [--alpha 1] --out DIR
    npt-ds inject-eval data/facts/*.jsonl --np NP_DIR [--alpha 0.25,0.5,1,2] [--out results.json]
    npt-ds tb runs/demo [--out DIR]

A command's module is imported only when that command runs (``importlib``): most of them pull in torch,
transformers or deepspeed, which ``npt-ds --help`` and ``npt-ds plan`` never need.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from .config import ConfigError


@dataclass(frozen=True)
class Command:
    module: str  # the room's module that holds the command
    add_arguments: str  # its function that fills the command's parser
    run: str  # its function that runs the parsed arguments -> exit code
    help: str

    def function(self, name: str):
        return getattr(importlib.import_module(self.module), name)


COMMANDS = {
    "prepare": Command("npt_ds.data.prepare", "add_prepare_arguments", "run_prepare",
                       "tokenise a text source into memory-mapped token shards (data.source: prepared)"),
    "train": Command("npt_ds.train.run", "add_train_arguments", "run_train",
                     "train NP components (one process; use launch/*.sh for several)"),
    "convert": Command("npt_ds.tools.convert", "add_convert_arguments", "run_convert",
                       "convert layers and write the (initial) NP weights"),
    "eval": Command("npt_ds.tools.eval", "add_eval_arguments", "run_eval",
                    "base vs NPT perplexity on held-out Shakespeare plays"),
    "sweep": Command("npt_ds.tools.sweep", "add_sweep_arguments", "run_sweep",
                     "run a base recipe under a list/grid of overrides and seeds; tabulate"),
    "plan": Command("npt_ds.planning.cli", "add_plan_arguments", "run_plan",
                    "per-GPU memory plan for a config (no weights, no GPU)"),
    "resolve": Command("npt_ds.parallel.resolve", "add_resolve_arguments", "run_resolve",
                       "what the trainer would use here: node layout, precision, frozen base, DeepSpeed config"),
    "generate": Command("npt_ds.tools.generate", "add_generate_arguments", "run_generate",
                        "generate text with the NPT model (streamed)"),
    "export": Command("npt_ds.tools.export", "add_export_arguments", "run_export",
                      "write a self-contained Hugging Face model dir (trust_remote_code)"),
    "inject": Command("npt_ds.tools.inject", "add_inject_arguments", "run_inject",
                      "fold a context's modulation into the NPT layers' weights (saved as deltas)"),
    "inject-eval": Command("npt_ds.tools.inject_eval", "add_inject_eval_arguments", "run_inject_eval_command",
                           "measure knowledge injection on facts (answer rank, locality, damage)"),
    "tb": Command("npt_ds.metrics.tensorboard", "add_tb_arguments", "run_tb",
                  "convert a run's metrics.jsonl into TensorBoard event files (RUN_DIR/tb)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's sub-parser; only `command`'s (all, when None) gets its arguments, so only its module loads."""
    parser = argparse.ArgumentParser(prog="npt-ds", description="NPT training on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if command in (None, name):
            cmd.function(cmd.add_arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        return cmd.function(cmd.run)(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"npt-ds {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
