"""Hardware-dependent choices resolved once at start: precision, and how ZeRO-3 holds the frozen base.

Under plain ZeRO-3 every rank all-gathers every frozen base weight on every forward, although the
base never changes.  ``deepspeed.frozen_base``:

* ``partitioned`` -- plain ZeRO-3: the base is partitioned and re-gathered every micro-batch.
* ``resident``    -- every parameter is ZeRO-3-*persistent* (``stage3_param_persistence_threshold`` and
  ``stage3_model_persistence_threshold`` above the model size) and :mod:`npt_ds.resident_base` keeps
  the frozen ones from ever being released: gathered once, so a step gathers only the trainable
  parameters; gradients and optimizer state stay partitioned.  Memory: the whole
  base on every rank, as ZeRO-2.  ``auto`` picks it when the planner says it fits.
* ``hpz``         -- ZeRO++ hierarchical partitioning (``zero_hpz_partition_size`` = GPUs per node): a
  secondary copy of the partitions within each node, so the re-gathers stay on the intra-node link.
* ``quantized``   -- ZeRO++ ``zero_quantized_nontrainable_weights``: the frozen weights are held and
  all-gathered as int8.  Needs DeepSpeed's CUDA quantizer kernels: refused on CPU with one line.

``deepspeed.precision: auto`` is bf16 on a CUDA device that supports it and on a CPU with bf16 units
(AMX tiles or AVX512-BF16), fp32 otherwise: on an AVX-512 CPU without them a bf16 matmul runs at a
fifth of fp32's speed (61 vs 283 GFLOP/s, 2048², measured on such a machine), while with AVX512-BF16
it runs at 2.7x fp32's (199 vs 74 GFLOP/s, 1024², one thread, measured on this project's CI machine).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .config import ConfigError, TrainConfig

# dense bf16 tensor-core peak, TFLOP/s, by a name fragment of torch.cuda.get_device_name() (first match wins)
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))
PERSIST_ALL = 10**15  # elements: above any model, so every parameter is persistent


def resolve_precision(requested: str) -> tuple[str, str]:
    """-> (fp32 | bf16 | fp16, why)."""
    if requested != "auto":
        return requested, "as configured"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {torch.cuda.get_device_name()} computes bf16"
        return "fp32", "this CUDA device has no bf16"
    if _cpu_has("_is_amx_tile_supported"):
        return "bf16", "CPU with AMX tiles"
    if _cpu_has("_is_avx512_bf16_supported"):
        return "bf16", "CPU with AVX512-BF16"
    return "fp32", "CPU without bf16 units: bf16 matmuls are several times slower than fp32 here"


def _cpu_has(probe: str) -> bool:
    return bool(getattr(torch.cpu, probe, lambda: False)())


def peak_tflops(configured: float = 0.0, device_name: str | None = None) -> tuple[float | None, str]:
    """-> (peak TFLOP/s per device or None, where it comes from): ``perf.peak_tflops`` when > 0, else the
    CUDA device's dense bf16 peak from :data:`BF16_PEAK_TFLOPS`; None on CPU or an unknown GPU."""
    if configured > 0:
        return configured, "perf.peak_tflops"
    if device_name is None:
        if not torch.cuda.is_available():
            return None, "no peak known for a CPU; set perf.peak_tflops for an MFU"
        device_name = torch.cuda.get_device_name()
    for fragment, peak in BF16_PEAK_TFLOPS:
        if fragment in device_name:
            return peak, f"{device_name} bf16 dense"
    return None, f"no peak known for {device_name}; set perf.peak_tflops for an MFU"


def device_memory_gib(ranks_per_node: int) -> float:
    """Memory one rank may use: its GPU's, or this machine's RAM shared by the ranks on it."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * size / 2**30 / max(1, ranks_per_node)


def ranks_per_node(world: int) -> int:
    """GPUs (ranks) per node: the launcher's LOCAL_WORLD_SIZE when set, else every rank on one node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def resolve_frozen_base(cfg: TrainConfig, world: int, zero_stage: int) -> tuple[str, str]:
    """-> (partitioned | resident | hpz | quantized, why); only ZeRO-3 partitions parameters at all."""
    mode = cfg.deepspeed.frozen_base
    if zero_stage != 3:
        return "partitioned", f"ZeRO-{zero_stage} does not partition parameters (the base is resident anyway)"
    if mode == "quantized" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.frozen_base: quantized needs DeepSpeed's CUDA quantizer kernels; on this "
                          "CPU-only machine use resident, hpz or partitioned")
    if mode != "auto":
        return mode, "as configured"
    if cfg.model.quantization != "none":
        return "partitioned", "a bitsandbytes base is partitioned as loaded (see npt_ds.quant)"
    from .plan import inputs_from_config, plan_memory

    per_node = ranks_per_node(world)
    nodes = max(1, world // per_node)
    mem = device_memory_gib(per_node)
    try:
        inputs = inputs_from_config(cfg, nodes=nodes, gpus_per_node=per_node, gpu_mem_gib=mem, zero_stage=3)
    except ConfigError as exc:  # no config.json to plan from (e.g. a bare .gguf): stay on the safe side
        return "partitioned", f"the planner cannot read this model's shape ({exc})"
    resident = plan_memory(dataclasses.replace(inputs, frozen_base="resident"))
    if resident.fits:
        return "resident", f"the whole base fits on every rank ({resident.total / 2**30:.1f} of {mem:.0f} GiB)"
    if nodes > 1 and per_node > 1:
        return "hpz", (f"the base does not fit resident ({resident.total / 2**30:.1f} > {mem:.0f} GiB); "
                       "re-gathers stay within a node")
    return "partitioned", f"the base does not fit resident ({resident.total / 2**30:.1f} > {mem:.0f} GiB)"


def apply_frozen_base(ds: dict, mode: str, gpus_per_node: int) -> dict:
    """The zero_optimization settings of `mode` written into DeepSpeed config `ds` (in place; returned)."""
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3 or mode == "partitioned":
        return ds
    if mode == "resident":
        zero["stage3_param_persistence_threshold"] = PERSIST_ALL
        zero["stage3_model_persistence_threshold"] = PERSIST_ALL
    elif mode == "hpz":
        zero["zero_hpz_partition_size"] = gpus_per_node
    elif mode == "quantized":
        zero["zero_quantized_nontrainable_weights"] = True
    return ds


def resolve_hardware(cfg: TrainConfig, world: int) -> tuple[TrainConfig, list[str]]:
    """`cfg` with precision / frozen_base 'auto' replaced by what this hardware gets, and one line on each."""
    precision, why_p = resolve_precision(cfg.deepspeed.precision)
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, precision=precision))
    from .ds_config import template_zero_stage

    stage = cfg.deepspeed.zero_stage if cfg.deepspeed.zero_stage is not None else template_zero_stage(cfg)
    mode, why_f = resolve_frozen_base(cfg, world, stage)
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, frozen_base=mode))
    return cfg, [f"precision: {precision} ({why_p})", f"frozen base: {mode} ({why_f})"]
