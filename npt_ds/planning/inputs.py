"""Plan inputs from a run config (:class:`~npt_ds.config.TrainConfig`) and a cluster's size."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..config import ConfigError, TrainConfig, parse_layer_spec
from .memory import DS_ALLGATHER_BUCKET, DS_PREFETCH_BUCKET, DS_REDUCE_BUCKET, DS_SUB_GROUP, DeepSpeedKnobs, PlanInputs
from .shape import read_json, load_shape

REPO_ROOT = Path(__file__).resolve().parents[2]  # ds_configs/ lives beside the package


def read_deepspeed_knobs(path: str, search_dirs: Sequence[Path] = ()) -> DeepSpeedKnobs:
    """zero_optimization knobs of the DeepSpeed JSON ``path`` (tried as given, then under each of
    ``search_dirs``); an absent file gives DeepSpeed's defaults with stage None (the planner then uses 3)."""
    candidates = [Path(path).expanduser()] + [Path(d) / path for d in search_dirs]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return DeepSpeedKnobs(source=f"{path} not found: DeepSpeed defaults")
    data = read_json(found)
    zero = data.get("zero_optimization") or {}

    def num(key: str, default: int, alias: str | None = None) -> int:
        v = zero.get(key, zero.get(alias, default) if alias else default)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    def offloaded(key: str) -> bool:
        v = zero.get(key) or {}
        return isinstance(v, dict) and str(v.get("device", "none")).lower() in ("cpu", "nvme")

    stage = zero.get("stage")
    return DeepSpeedKnobs(
        stage=int(stage) if isinstance(stage, int) and not isinstance(stage, bool) else None,
        reduce_bucket_size=num("reduce_bucket_size", DS_REDUCE_BUCKET),
        allgather_bucket_size=num("allgather_bucket_size", DS_ALLGATHER_BUCKET),
        prefetch_bucket_size=num("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET, "prefetch_bucket_size"),
        sub_group_size=num("sub_group_size", DS_SUB_GROUP),
        offload_optimizer=offloaded("offload_optimizer"), offload_param=offloaded("offload_param"),
        source=str(found))


def inputs_from_config(cfg: TrainConfig, *, nodes: int, gpus_per_node: int, gpu_mem_gib: float,
                       zero_stage: int | None = None, activation_checkpointing: bool | None = None
                       ) -> PlanInputs:
    """Plan inputs from a loaded :class:`TrainConfig` and the cluster; explicit arguments win.

    ZeRO stage: ``zero_stage`` arg, else ``deepspeed.zero_stage``, else the DeepSpeed JSON's
    ``zero_optimization.stage``, else 3.  ``deepspeed.config`` is looked up as the trainer does: as
    given, then under the repository root.  Student stream and logits: as ``npt_ds.train.trainer`` decides.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    if gpu_mem_gib <= 0:
        raise ConfigError("--gpu-mem must be > 0 (GiB per GPU)")
    shape = load_shape(cfg.model.path, cfg.model.tiny)
    teacher = None
    if cfg.model.teacher_path:
        teacher = load_shape(cfg.model.teacher_path, cfg.model.teacher_tiny)
    layers = tuple(parse_layer_spec(cfg.npt.layers, shape.num_layers))
    ds = read_deepspeed_knobs(cfg.deepspeed.config, [REPO_ROOT])
    stage = next(s for s in (zero_stage, cfg.deepspeed.zero_stage, ds.stage, 3) if s is not None)
    loss = cfg.loss
    student = cfg.schedule.mode != "single_layer" or loss.fidelity_weight > 0 or loss.kd_weight > 0
    logits = loss.kd_weight > 0 or (loss.fidelity_weight > 0 and loss.fidelity_on != "hidden")
    safe = cfg.npt.safe_mode
    return PlanInputs(
        shape=shape, npt_layers=layers, rank=cfg.npt.rank, num_ranks=cfg.npt.num_ranks,
        dual=cfg.npt.dual and not safe, multiplicative=cfg.npt.multiplicative and not safe, down_bias=cfg.npt.down_bias,
        seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.micro_batch_size,
        precision="bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision,  # GPUs: bf16
        model_dtype=cfg.model.dtype, quantization=cfg.model.quantization,
        frozen_base="partitioned" if cfg.deepspeed.frozen_base == "auto" else cfg.deepspeed.frozen_base,
        zero_stage=int(stage), nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=float(gpu_mem_gib),
        activation_checkpointing=(cfg.model.activation_checkpointing if activation_checkpointing is None
                                  else activation_checkpointing),
        student_stream=student, want_logits=logits, teacher_shape=teacher, ds=ds,
        keep_vectors=loss.guidance_enabled)
