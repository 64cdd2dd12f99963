"""`npt-ds convert`: convert chosen layers of a base and write the (initial) NP weights alone."""
from __future__ import annotations

import argparse

import torch

from ..config import ModelConfig
from ..model import convert_model, load_base_model, save_np_weights
from .session import add_model_arguments, npt_config_of


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for np_weights.safetensors + npt_spec.json")


def run_convert(args) -> int:
    torch.manual_seed(args.seed)
    model = load_base_model(ModelConfig(path=args.model), seed=args.seed)
    layers = convert_model(model, npt_config_of(args))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = save_np_weights(model, args.out)
    print(f"converted layers {layers} of {model.config.num_hidden_layers}: {n:,} NP parameters -> {out}")
    return 0
