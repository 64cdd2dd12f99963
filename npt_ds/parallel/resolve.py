"""What the trainer uses on this hardware: ``precision`` and ``frozen_base`` 'auto' resolved, with the reasons."""
from __future__ import annotations

import dataclasses

from ..config import TrainConfig
from .devices import resolve_precision
from .ds_config import template_zero_stage
from .zero import resolve_frozen_base


def resolve_hardware(cfg: TrainConfig, world: int) -> tuple[TrainConfig, list[str]]:
    """`cfg` with precision / frozen_base 'auto' replaced by what this hardware gets, and one line on each."""
    precision, why_p = resolve_precision(cfg.deepspeed.precision)
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, precision=precision))
    stage = cfg.deepspeed.zero_stage if cfg.deepspeed.zero_stage is not None else template_zero_stage(cfg)
    mode, why_f = resolve_frozen_base(cfg, world, stage)
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, frozen_base=mode))
    return cfg, [f"precision: {precision} ({why_p})", f"frozen base: {mode} ({why_f})"]
