"""Optimizer parameter groups from name patterns, and LR updates that honour each group's multiplier.

``optim.param_groups`` is an ordered list of ``{pattern, lr_mult, weight_decay}``; a trainable
parameter joins the first pattern (``fnmatch``, case-sensitive, on its ``named_parameters()`` name)
that matches it, else the ``default`` group (``lr_mult`` 1, ``optim.weight_decay``).  Parameters whose
name matches any ``optim.no_decay`` pattern go to a ``/no_decay`` twin of their group with weight
decay 0.  The result is a plain list of dicts, usable as ``deepspeed.initialize(model_parameters=...)``.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from ..config import OptimConfig


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups with keys ``params``, ``lr`` (= cfg.lr × lr_mult), ``weight_decay``, ``name``, ``lr_mult``.

    Frozen parameters are left out; every trainable parameter is in exactly one group.  Groups come
    in config order, then ``default``; a group's decay half precedes its ``/no_decay`` half; empty
    groups are dropped.
    """
    specs = [(g["pattern"], float(g.get("lr_mult", 1.0)), float(g.get("weight_decay", cfg.weight_decay)))
             for g in cfg.param_groups]
    specs.append(("default", 1.0, float(cfg.weight_decay)))
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        slot = next((i for i, (pattern, _, _) in enumerate(specs[:-1]) if fnmatchcase(name, pattern)), len(specs) - 1)
        no_decay = any(fnmatchcase(name, pattern) for pattern in cfg.no_decay)
        buckets.setdefault((slot, no_decay), []).append(param)
    groups = []
    for (slot, no_decay), params in sorted(buckets.items()):
        pattern, lr_mult, weight_decay = specs[slot]
        groups.append({
            "params": params,
            "lr": cfg.lr * lr_mult,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{pattern}/no_decay" if no_decay else pattern,
            "lr_mult": lr_mult,
        })
    return groups


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to ``lr × group['lr_mult']`` (1 when a group has no multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, group_indices: list[int]) -> None:
    """Zero the optimizer state (Adam moments and step count) of the given param groups, in place.

    Works on a torch optimizer and on DeepSpeed's ZeRO / bf16 wrappers (see :func:`_state_keys`).  The next step then
    behaves as the first: an Adam update of about LR, whatever the group went through before (with LR 0 and
    zero gradients its step count still advanced and its moments decayed, which scales a first real update
    to several times the LR).
    """
    base = getattr(optimizer, "optimizer", optimizer)
    for i in group_indices:
        for p in _state_keys(optimizer, base, i):
            state = base.state.get(p)
            for key, value in (state or {}).items():
                if torch.is_tensor(value):
                    value.zero_()
                elif isinstance(value, (int, float)):
                    state[key] = type(value)(0)


def _state_keys(optimizer, base: torch.optim.Optimizer, group: int) -> list[torch.Tensor]:
    """The tensors the wrapped optimizer's state of param group `group` is keyed by.

    ZeRO-3 keeps its flat fp32 partitions aside (one or more sub-groups per group) and puts them into the
    group only for the duration of a step; ZeRO-1/2, the bf16 wrapper and plain torch keep them in the group.
    """
    flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        owner = optimizer.sub_group_to_group_id
        items = owner.items() if isinstance(owner, dict) else enumerate(owner)
        return [flat[sub] for sub, g in items if g == group]
    return list(base.param_groups[group]["params"])
