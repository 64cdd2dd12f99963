"""Turn chosen decoder layers of a Llama into NPT layers, freeze the base, switch modes."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from ..config import NPTConfig, parse_layer_spec
from .np_component import NPComponent
from .npt_layer import STUDENT, TEACHER, NPTDecoderLayer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers; expected a Llama-style causal LM")
    return layers


def convert_model(model: nn.Module, cfg: NPTConfig, freeze_base: bool = True) -> list[int]:
    """Replace the selected decoder layers in place; returns their indices. Base params frozen."""
    layers = decoder_layers(model)
    indices = parse_layer_spec(cfg.layers, len(layers))
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    config = model.config
    ref = next(model.parameters())
    for i in indices:
        old = layers[i]
        if isinstance(old, NPTDecoderLayer):
            raise ValueError(f"layer {i} is already an NPT layer")
        np_comp = NPComponent(config.hidden_size, config.intermediate_size, cfg.rank, cfg.num_ranks,
                              dual=cfg.dual and not cfg.safe_mode,
                              multiplicative=cfg.multiplicative and not cfg.safe_mode, down_bias=cfg.down_bias,
                              init_b=cfg.init_b, init_std_down=cfg.init_std_down,
                              init_std_a=cfg.init_std_a, init_std_b=cfg.init_std_b, fp32_update=cfg.fp32_update)
        np_comp.to(device=ref.device if ref.device.type != "meta" else "cpu")
        layers[i] = NPTDecoderLayer(old, i, np_comp, cfg.modulation_scale)
    model.npt_config = cfg
    model.npt_layer_indices = indices
    return indices


def npt_layers(model: nn.Module) -> list[NPTDecoderLayer]:
    return [m for m in decoder_layers(model) if isinstance(m, NPTDecoderLayer)]


def set_mode(model: nn.Module, mode: str) -> None:
    """'teacher' = the original model; 'student' = NPT layers active."""
    if mode not in (TEACHER, STUDENT):
        raise ValueError(f"mode must be 'teacher' or 'student', got {mode!r}")
    for layer in npt_layers(model):
        layer.mode = mode


def np_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if ".np." in name:
            yield name, p
