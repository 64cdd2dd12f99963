"""The one way the tools load a trained NPT: base model + NP weights + saved injections, and its tokenizer;
and the command-line arguments the tools share."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from ..config import ModelConfig, NPTConfig
from ..model import load_base_model, load_np_weights, load_tokenizer, set_mode


def load_npt(np_dir: str, model_path: str = "smollm2", *, injections: bool = True,
             seed: int = 0) -> tuple[nn.Module, object, list[int]]:
    """-> (model in student mode, tokenizer, NPT layer indices); the NP dir's injections are applied unless
    ``injections=False``.  Everything goes through :func:`npt_ds.model.load_np_weights`."""
    cfg = ModelConfig(path=model_path)
    model = load_base_model(cfg, seed=seed)
    layers = load_np_weights(model, np_dir, injections=injections)
    set_mode(model, "student")
    return model, load_tokenizer(cfg), layers


def add_np_arguments(parser: argparse.ArgumentParser) -> None:
    """--np and --model: a trained NPT to load."""
    parser.add_argument("--np", required=True, help="NP weights dir (a checkpoint's np/, or an inject --out dir)")
    parser.add_argument("--model", default="smollm2",
                        help="the base the NP weights were trained on: 'smollm2' (default), 'tiny', an HF dir, a file")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The base and a conversion spec, for commands that convert a base themselves (convert, eval)."""
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (PyPI asset, default), 'tiny', an HF dir, a .safetensors or .gguf file")
    parser.add_argument("--layers", default="upper_half", help="'14,15', '8-15', 'upper_half' or 'all'")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--num-ranks", type=int, default=1)
    parser.add_argument("--modulation-scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def npt_config_of(args) -> NPTConfig:
    """The NPTConfig of :func:`add_model_arguments`' flags."""
    return NPTConfig(layers=args.layers, rank=args.rank, num_ranks=args.num_ranks,
                     modulation_scale=args.modulation_scale)


def parse_floats(text: str, flag: str) -> list[float]:
    """A comma list of numbers given to `flag`; a one-line error otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: cannot parse {text!r}; give numbers separated by commas, e.g. 0.25,0.5,1,2") from None
    if not values:
        raise ValueError(f"{flag}: no values in {text!r}; give e.g. 0.25,0.5,1,2")
    return values


def encode(tokenizer, text: str, *, chat: bool = False, special: bool = True) -> torch.Tensor:
    """Token ids (1, T) of `text`; with `chat` (and a tokenizer that has a template) as one user turn."""
    if chat and uses_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        special = False  # the template wrote the special tokens
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
