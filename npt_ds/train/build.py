"""What the engine trains: the base loaded and converted, placed for its ZeRO stage and frozen-base mode, the
cross-width teacher, and the loss, wrapped in :class:`~npt_ds.train.module.NPTTrainModule`.

* ZeRO-3, ``frozen_base`` partitioned / hpz / quantized: the base is built partitioned (transformers under an
  ``HfDeepSpeedConfig``) and every frozen decoder layer is one ZeRO-3 leaf (one gather per layer, not per module).
* ZeRO-3, ``resident``: the base is built whole on every rank, cast to the training precision and placed on the
  rank's device by hand, and kept out of the engine (``frozen_outside``): ZeRO-3 manages the trainable parameters
  only.  Memory is the same as when ZeRO-3 held the base gathered for good; the per-module hooks and coordinator
  work on the frozen modules are gone.
* ZeRO 0-2: as loaded; DeepSpeed casts and places the module.
"""
from __future__ import annotations

import contextlib
import dataclasses
from fnmatch import fnmatchcase

import torch
from deepspeed.utils import set_z3_leaf_module
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..config import ConfigError, ModelConfig, TrainConfig
from ..model import NPTDecoderLayer, convert_model, decoder_layers, load_base_model, npt_layers
from ..model.projector import LogitProjector
from ..parallel.groups import compute_device
from .losses import NPTLoss
from .module import NPTTrainModule

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def zero3_construction(ds_config: dict, partitioned: bool):
    """While `partitioned`, transformers builds/loads the base partitioned (an HfDeepSpeedConfig is alive).

    Scoped to model construction: a global left behind would make every later model in the process
    (tests, eval tools) silently build as ZeRO-3 placeholders.
    """
    if not partitioned:
        yield
        return
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def mark_frozen_layers_as_zero3_leaves(model) -> None:
    """One ZeRO-3 gather/release per frozen decoder layer instead of one per submodule (~10 % faster on CPU).

    NPT layers stay non-leaf: their training pass is `fused()`, not `forward`, and calls the MLP's linears
    directly, so a partitioned base needs their own hooks."""
    for layer in decoder_layers(model):
        if not isinstance(layer, NPTDecoderLayer):
            set_z3_leaf_module(layer, True)


def cross_width_teacher(cfg: TrainConfig, model) -> tuple[torch.nn.Module | None, LogitProjector | None]:
    """A KD teacher of another width (model.teacher_path) and its logit projector, or (None, None)."""
    if not cfg.model.teacher_path:
        return None, None
    tcfg = ModelConfig(path=cfg.model.teacher_path, dtype=cfg.model.dtype, tiny=cfg.model.teacher_tiny)
    teacher = load_base_model(tcfg, seed=cfg.seed + 1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"model.teacher_path: teacher vocab {teacher.config.vocab_size} != student vocab "
                         f"{model.config.vocab_size}; KD needs a shared tokenizer")
    return teacher, LogitProjector(teacher.config.hidden_size, model.config.hidden_size)


def build_train_module(cfg: TrainConfig, ds_config: dict) -> tuple[NPTTrainModule, list[int]]:
    """-> (the module for deepspeed.initialize, the NPT layer indices)."""
    zero3 = ds_config["zero_optimization"].get("stage", 0) == 3
    outside = zero3 and cfg.deepspeed.frozen_base == "resident"
    with zero3_construction(ds_config, partitioned=zero3 and not outside):
        model = load_base_model(cfg.model, seed=cfg.seed)
    layer_indices = convert_model(model, cfg.npt)
    if zero3 and not outside:
        mark_frozen_layers_as_zero3_leaves(model)
    if cfg.model.activation_checkpointing:
        for layer in npt_layers(model):
            layer.checkpoint_student = True
    teacher, projector = cross_width_teacher(cfg, model)
    if outside:  # what the engine would have done to a module it holds: the precision's dtype, the rank's device
        for part in (model, teacher):
            if part is not None:
                part.to(device=compute_device(), dtype=DTYPES.get(cfg.deepspeed.precision))
    if cfg.schedule.mode == "sequential":  # one layer (or group) per stage: the loss sees that many layers
        group = cfg.schedule.sequential_group
        if len(layer_indices) % group:
            divisors = [d for d in range(1, len(layer_indices) + 1) if len(layer_indices) % d == 0]
            raise ConfigError(f"schedule.sequential_group: {len(layer_indices)} NPT layers do not split into groups "
                              f"of {group}; use one of {', '.join(map(str, divisors))}")
        loss_fn = NPTLoss(dataclasses.replace(cfg.loss, layer_weights="uniform"), group)
    else:
        loss_fn = NPTLoss(cfg.loss, len(layer_indices))
    return NPTTrainModule(model, loss_fn, teacher, projector, frozen_outside=outside), layer_indices


def default_curriculum(cfg: TrainConfig) -> str:
    """multi_layer without a curriculum: thirds of teacher, mixed 0.5, student scaffolding."""
    if cfg.schedule.mode != "multi_layer":
        return ""
    third = max(cfg.schedule.total_steps // 3, 1)
    return f"teacher:{third},mixed:{third}:0.5,student:{max(cfg.schedule.total_steps - 2 * third, 1)}"


def sequential_optim_config(optim, layer_indices: list[int]):
    """One param group per NPT layer (keeping the LR multiplier configured for NP params)."""
    probe = "model.model.layers.{}.np.W_down"
    groups = []
    for i in layer_indices:
        mult = next((g.get("lr_mult", 1.0) for g in optim.param_groups if fnmatchcase(probe.format(i), g["pattern"])), 1.0)
        groups.append({"pattern": f"*layers.{i}.np.*", "lr_mult": mult})
    return dataclasses.replace(optim, param_groups=groups + list(optim.param_groups))
