"""`npt-ds` command line: prepare, train, convert, eval, plan.

    npt-ds prepare shakespeare --tokenizer smollm2 --out data/prepared/shakespeare
    npt-ds train configs/smollm2_demo.yaml [key.path=value ...]
    npt-ds convert --layers upper_half --out runs/np-init
    npt-ds eval [--np runs/demo/checkpoints/step-00000200/np] [--layers upper_half]
    npt-ds plan configs/llama3_8b_multinode.yaml --nodes 2 --gpus-per-node 8 --gpu-mem 80
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, DataConfig, ModelConfig, NPTConfig


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (PyPI asset, default), 'tiny', an HF dir, a .safetensors or .gguf file")
    parser.add_argument("--layers", default="upper_half", help="'14,15', '8-15', 'upper_half' or 'all'")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--num-ranks", type=int, default=1)
    parser.add_argument("--modulation-scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def _npt_config(args) -> NPTConfig:
    return NPTConfig(layers=args.layers, rank=args.rank, num_ranks=args.num_ranks,
                     modulation_scale=args.modulation_scale)


def run_convert(args) -> int:
    import torch

    from .model import convert_model, load_base_model, save_np_weights

    torch.manual_seed(args.seed)
    model = load_base_model(ModelConfig(path=args.model), seed=args.seed)
    layers = convert_model(model, _npt_config(args))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = save_np_weights(model, args.out)
    print(f"converted layers {layers} of {model.config.num_hidden_layers}: {n:,} NP parameters -> {out}")
    return 0


def run_eval(args) -> int:
    import torch

    from .data import eval_batches
    from .distributed import init_distributed
    from .evaluate import evaluate
    from .model import convert_model, load_base_model, load_np_weights, load_tokenizer

    init_distributed()
    torch.manual_seed(args.seed)
    mcfg = ModelConfig(path=args.model)
    model = load_base_model(mcfg, seed=args.seed)
    if args.np:
        layers = load_np_weights(model, args.np)
        source = f"NP weights {args.np}"
    else:
        layers = convert_model(model, _npt_config(args))
        source = "freshly initialised NP components"
    data = DataConfig(eval_batches=args.batches, eval_seq_len=args.seq_len)
    result = evaluate(model, eval_batches(data, load_tokenizer(mcfg)))
    print(f"held-out Shakespeare ({', '.join(data.eval_holdout)}), {result['eval/tokens']} tokens; "
          f"NPT layers {layers} ({source})")
    print(f"  base perplexity  {result['eval/ppl_base']:10.3f}")
    print(f"  NPT perplexity   {result['eval/ppl_npt']:10.3f}")
    print(f"  fidelity MSE     {result['eval/fidelity_mse']:10.4g}  (final hidden state, NPT vs base)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .plan import add_plan_subparser
    from .prepare import add_prepare_subparser
    from .train import add_train_arguments

    parser = argparse.ArgumentParser(prog="npt-ds", description="NPT training on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_subparser(sub)
    train = sub.add_parser("train", help="train NP components (one process; use launch/*.sh for several)")
    add_train_arguments(train)
    convert = sub.add_parser("convert", help="convert layers and write the (initial) NP weights")
    _model_arguments(convert)
    convert.add_argument("--out", required=True, help="directory for np_weights.safetensors + npt_spec.json")
    ev = sub.add_parser("eval", help="base vs NPT perplexity on held-out Shakespeare plays")
    _model_arguments(ev)
    ev.add_argument("--np", help="NP weights dir (from convert or a checkpoint's np/); default: fresh init")
    ev.add_argument("--batches", type=int, default=4)
    ev.add_argument("--seq-len", type=int, default=256)
    add_plan_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import run_train

            return run_train(args)
        if args.command == "prepare":
            from .prepare import run_prepare

            return run_prepare(args)
        if args.command == "plan":
            from .plan import run_plan

            return run_plan(args)
        return {"convert": run_convert, "eval": run_eval}[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"npt-ds {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
