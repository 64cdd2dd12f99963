"""NPT models the tests share."""
from __future__ import annotations

import torch
from torch import nn

from npt_ds.config import NPTConfig
from npt_ds.model import convert_model, npt_layers, set_mode, tiny_llama


def strong_npt(dual: bool = False, layers: str = "1,3", down_bias: bool = False) -> nn.Module:
    """A tiny fp64 NPT whose NP components are large enough to change the outputs a lot."""
    model = tiny_llama()
    convert_model(model, NPTConfig(layers=layers, rank=4, num_ranks=2, modulation_scale=0.37, dual=dual,
                                   down_bias=down_bias))
    model.double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in npt_layers(model):
            for p in layer.np.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    set_mode(model, "student")
    return model
