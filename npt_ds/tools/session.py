"""The one way the tools load a trained NPT: base model + NP weights + saved injections, and its tokenizer."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
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
