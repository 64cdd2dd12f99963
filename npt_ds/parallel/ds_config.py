"""Build the DeepSpeed config dict from a ds_configs/*.json template and the run config.

Template values "auto" are filled from the run config (batch, accumulation, clipping, optimizer
hyper-parameters); precision and ZeRO stage from the `deepspeed:` section override the template.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..config import ConfigError, TrainConfig
from .devices import resolve_precision
from .zero import apply_frozen_base

REPO_ROOT = Path(__file__).resolve().parents[2]  # ds_configs/ lives beside the package


def _resolve(path: str) -> Path:
    p = Path(path)
    for candidate in (p, REPO_ROOT / p):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"deepspeed.config: {path!r} not found; use one of ds_configs/*.json "
                      "(zero3_fp32.json, zero3_bf16.json, zero2_bf16.json)")


def _template(cfg: TrainConfig) -> tuple[Path, dict]:
    path = _resolve(cfg.deepspeed.config)
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def template_zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage of the DeepSpeed JSON template (3 when it names none)."""
    return int(_template(cfg)[1].get("zero_optimization", {}).get("stage", 3))


def build_ds_config(cfg: TrainConfig, world_size: int, ranks_per_node: int | None = None) -> dict:
    """The DeepSpeed config for `cfg` on `world_size` ranks, `ranks_per_node` of them per node (hpz's partition;
    default: all on one node).  `deepspeed.frozen_base` and
    `deepspeed.precision` should be resolved first (npt_ds.parallel.resolve.resolve_hardware); an unresolved
    'auto' frozen base builds plain partitioned ZeRO-3."""
    path, template = _template(cfg)
    ds = copy.deepcopy(template)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = opt.setdefault("params", {})
    for key, value in {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                       "weight_decay": cfg.optim.weight_decay}.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
    params.setdefault("torch_adam", True)  # avoids a long C++ op build
    precision = cfg.deepspeed.precision
    ds.pop("bf16", None)
    ds.pop("fp16", None)
    if precision == "auto":
        precision = resolve_precision(precision)[0]
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    apply_frozen_base(ds, cfg.deepspeed.frozen_base, ranks_per_node or world_size)
    leftovers = [k for k, v in _walk(ds) if v == "auto"]
    if leftovers:
        raise ConfigError(f"deepspeed.config: {path.name} leaves {leftovers[0]!r} as 'auto' with nothing to fill it; "
                          "set a value in the JSON")
    if cfg.checkpoint.node_local:  # every node writes its own ranks' shards to its own disk
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "use_node_local_storage": True}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node
