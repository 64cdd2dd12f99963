"""Typed run configuration: one dataclass per component, validated in one place.

A YAML recipe maps 1:1 onto :class:`TrainConfig`.  Unknown keys, wrong types and
cross-field conflicts raise :class:`ConfigError` with a one-line message naming
the key and the fix.  The resolved config is written as JSON into every run dir.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


# the tiny random Llama of tests and dry runs (``model.path: tiny``; ``model.tiny`` overrides these)
TINY_DEFAULTS = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=True, rms_norm_eps=1e-5,
                     initializer_range=0.1)  # activations of a realistic scale, so NP gradients are too
GUIDANCE = {  # guidance loss component name -> its LossConfig weight field
    "modulation": "modulation_guidance",
    "info_bottleneck": "info_bottleneck",
    "orthogonality": "orthogonality",
    "projection_consistency": "projection_consistency",
}


@dataclass
class ModelConfig:
    path: str = "smollm2"  # "smollm2" (PyPI asset), "tiny", an HF dir, a .safetensors or .gguf file
    gguf_file: str | None = None  # file name inside `path` when path is a directory holding GGUF
    dtype: str = "float32"  # dtype the frozen base is held in: float32 | bfloat16
    quantization: str = "none"  # none | int8 | nf4 (bitsandbytes, frozen base only)
    tiny: dict = field(default_factory=dict)  # overrides for the tiny random Llama (tests, dry runs)
    teacher_path: str | None = None  # KD teacher of another width; None = the base model itself
    teacher_tiny: dict = field(default_factory=dict)  # overrides when teacher_path == "tiny"
    activation_checkpointing: bool = False  # recompute NPT layers in backward

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.quantization", self.quantization, ("none", "int8", "nf4"))


@dataclass
class NPTConfig:
    layers: str = "upper_half"  # "14,15", "8-15", "upper_half", "all"
    rank: int = 64
    num_ranks: int = 1
    modulation_scale: float = 0.1
    dual: bool = False  # also modulate W_up
    multiplicative: bool = False  # gate factor 0.5 + sigmoid(z) in (0.5, 1.5), 1 at init (never 1 + tanh)
    safe_mode: bool = False  # additive modulation only
    # r = a W_down + b_down (b_down zero at init, so a converted model starts as with the linear form): without
    # it v_a, v_b are linear in a and the gate update quadratic, blind to the sign of a (docs/ablations.md)
    down_bias: bool = False
    init_b: str = "small"  # small (std init_std_b) | zero
    init_std_down: float = 0.02
    init_std_a: float = 0.02
    init_std_b: float = 0.001
    # bf16/fp16 base: modulate gate and up in fp32 and add the update's effect to the MLP output in fp32, so the
    # small update of early training is not rounded away (npt_ds/model/np_component.py, docs/numerics.md)
    fp32_update: bool = True

    def __post_init__(self):
        _positive("npt.rank", self.rank)
        _positive("npt.num_ranks", self.num_ranks)
        _choice("npt.init_b", self.init_b, ("small", "zero"))
        if self.safe_mode and self.multiplicative:
            raise ConfigError("npt.multiplicative: safe_mode allows additive modulation only; "
                              "set npt.multiplicative: false or npt.safe_mode: false")


@dataclass
class DataConfig:
    source: str = "shakespeare"  # "shakespeare" | a hub dataset name | "files" | "prepared" (data.path)
    path: str = ""  # source: prepared -> the dir written by `npt-ds prepare`
    eval_path: str = ""  # a prepared held-out dir (any source); empty: the source's own held-out text
    files: list = field(default_factory=list)  # local text/jsonl/json/parquet files (source: files)
    eval_files: list = field(default_factory=list)  # held-out files (source: files)
    eval_split: str = "validation"  # hub datasets
    text_key: str = "text"
    split: str = "train"
    seq_len: int = 128
    micro_batch_size: int = 2
    eval_holdout: list = field(default_factory=lambda: ["hamlet", "tempest"])  # whole plays held out
    eval_batches: int = 4
    eval_seq_len: int = 256
    shuffle_buffer: int = 0  # streaming sources: 0 = keep document order (deterministic)
    shuffle: bool = True  # prepared: a seeded permutation of the windows per epoch (False: corpus order)
    prefetch: int = 4  # batches built ahead by a background thread (0: build them in the step)

    def __post_init__(self):
        _positive("data.seq_len", self.seq_len)
        _positive("data.micro_batch_size", self.micro_batch_size)
        _positive("data.eval_seq_len", self.eval_seq_len)
        if self.source == "files" and not self.files:
            raise ConfigError("data.files: source 'files' needs a list of local files; add data.files: [path, ...]")
        if self.source == "prepared" and not self.path:
            raise ConfigError("data.path: source 'prepared' needs the dir written by `npt-ds prepare`; "
                              "add data.path: DIR")
        if self.prefetch < 0:
            raise ConfigError("data.prefetch: must be >= 0 (0 builds batches in the step)")


@dataclass
class LossConfig:
    direct_weight: float = 1.0
    direct_target: str = "delta"  # delta: y_i -> what the teacher layer added | state: h_in + y_i -> the teacher's next state
    layer_weights: str = "uniform"  # uniform | linear | "1.0,0.9,..."
    layerwise_scaling: bool = False  # divide layer MSE by mean|teacher|
    reg_lambda: float = 1e-4
    fidelity_weight: float = 0.0  # final-state fidelity (needs the student stream)
    fidelity_on: str = "hidden"  # hidden | logits | both
    kd_weight: float = 0.0  # alpha_kd; 0 = off
    kd_temperature: float = 2.0
    kd_warmup_start: float = 0.1
    kd_warmup_frac: float = 0.2
    projector_ce_weight: float = 1.0  # cross-width KD: next-token CE that trains the logit projector
    modulation_guidance: float = 0.0
    info_bottleneck: float = 0.0
    orthogonality: float = 0.0
    orthogonality_pcs: int = 4
    projection_consistency: float = 0.0
    difficulty_mask: bool = False
    adaptive_weighting: bool = False
    adaptive_ema: float = 0.9

    @property
    def guidance_enabled(self) -> bool:
        """Whether any guidance loss reads the modulation vectors (they are then kept for every NPT layer)."""
        return any(getattr(self, name) > 0 for name in GUIDANCE.values())

    def __post_init__(self):
        _choice("loss.fidelity_on", self.fidelity_on, ("hidden", "logits", "both"))
        _choice("loss.direct_target", self.direct_target, ("delta", "state"))
        if self.kd_temperature <= 0:
            raise ConfigError("loss.kd_temperature must be > 0; use e.g. 2.0")
        if self.projector_ce_weight <= 0:
            raise ConfigError("loss.projector_ce_weight must be > 0: it is the only objective of the cross-width "
                              "logit projector (the KD term never trains it); use e.g. 1.0")
        if not 0.0 <= self.kd_warmup_frac <= 1.0:
            raise ConfigError("loss.kd_warmup_frac must lie in [0, 1]; use e.g. 0.2")


@dataclass
class ScheduleConfig:
    mode: str = "single_layer"  # single_layer | multi_layer | sequential
    total_steps: int = 100
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    curriculum: str = ""  # "teacher:5000,mixed:5000:0.5,student:20000" or shares "teacher:10%,..."; "" = teacher throughout
    sequential_steps_per_layer: int = 0  # sequential mode: steps per stage (a layer, or a group); 0 = total / stages
    sequential_group: int = 1  # sequential mode: NPT layers trained together per stage, bottom-up (divides their number)
    stop_at: int = 0  # end this invocation at this step (checkpointed); resume continues to total_steps

    def __post_init__(self):
        _choice("schedule.mode", self.mode, ("single_layer", "multi_layer", "sequential"))
        _positive("schedule.total_steps", self.total_steps)
        _positive("schedule.sequential_group", self.sequential_group)
        if self.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.5
    grad_accum: int = 1
    # name pattern (fnmatch on the parameter name) -> lr multiplier / weight decay
    param_groups: list = field(default_factory=lambda: [
        {"pattern": "*logit_projector*", "lr_mult": 5.0},
        {"pattern": "*router*", "lr_mult": 2.0},
        {"pattern": "*.np.*", "lr_mult": 1.0},
    ])
    no_decay: list = field(default_factory=lambda: ["*bias", "*norm*"])

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0; use e.g. 1e-3")
        _positive("optim.grad_accum", self.grad_accum)
        for i, g in enumerate(self.param_groups):
            if not isinstance(g, dict) or "pattern" not in g:
                raise ConfigError(f"optim.param_groups[{i}] needs a 'pattern' key, e.g. {{pattern: '*np*', lr_mult: 1.0}}")
            extra = set(g) - {"pattern", "lr_mult", "weight_decay"}
            if extra:
                raise ConfigError(f"optim.param_groups[{i}]: unknown key {sorted(extra)[0]!r}; "
                                  "allowed: pattern, lr_mult, weight_decay")


FROZEN_BASE_MODES = ("auto", "partitioned", "resident", "hpz", "quantized")


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero3_fp32.json"  # DeepSpeed JSON; optimizer/clip/batch filled in from here
    precision: str = "fp32"  # auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware computes it fast)
    zero_stage: int | None = None  # override the JSON's stage
    # ZeRO-3 and the frozen base (npt_ds.frozen_base): auto | partitioned | resident | hpz | quantized
    frozen_base: str = "auto"

    def __post_init__(self):
        _choice("deepspeed.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("deepspeed.frozen_base", self.frozen_base, FROZEN_BASE_MODES)
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage must be 0, 1, 2 or 3")


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | none | a step-XXXXXXXX dir
    save_final: bool = True
    node_local: bool = False  # run_dir on each node's own disk: every node writes its ranks' shards (DeepSpeed
    #                           use_node_local_storage) and its own `latest`; default: one shared filesystem


@dataclass
class DistributedConfig:
    timeout_s: float = 900.0  # bounds every collective: a lost rank ends the others' wait after this long
    # a rank whose loop makes no progress this long (or sends no heartbeat) is named and the job exits 4
    # (npt_ds.parallel.watchdog); 0 turns the watchdog off.  300 s: see the README ("A hung or lost rank")
    heartbeat_timeout_s: float = 300.0

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ConfigError("distributed.timeout_s: must be > 0 seconds (e.g. 900 on GPUs, 20 in tests)")
        if self.heartbeat_timeout_s < 0:
            raise ConfigError("distributed.heartbeat_timeout_s: must be >= 0 seconds (0 turns the watchdog off; "
                              "e.g. 300)")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/demo"
    log_every: int = 1
    eval_every: int = 0  # 0 = eval only at start and end
    console: bool = True
    wandb: bool = False
    wandb_project: str = "npt-ds"
    tensorboard: bool = False  # the same scalars to RUN_DIR/tb (needs the optional tensorboard package)
    max_consecutive_nan: int = 5


@dataclass
class PerfConfig:
    peak_tflops: float = 0.0  # the device's peak TFLOP/s for perf/mfu; 0 = from npt_ds.parallel.devices' bf16 table

    def __post_init__(self):
        if self.peak_tflops < 0:
            raise ConfigError(f"perf.peak_tflops must be >= 0 (0 = look the device up), got {self.peak_tflops}")


@dataclass
class TrainConfig:
    run_name: str = "npt"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    npt: NPTConfig = field(default_factory=NPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    inject_nan: dict = field(default_factory=dict)  # testing aid: {step: N, rank: R, repeat: 1} NaN micro-batches

    def __post_init__(self):
        if self.model.quantization != "none" and self.deepspeed.precision == "fp16":
            raise ConfigError("deepspeed.precision: fp16 cannot be combined with model.quantization="
                              f"{self.model.quantization}; use deepspeed.precision: fp32")
        if self.loss.kd_weight == 0 and self.model.teacher_path:
            raise ConfigError("model.teacher_path is set but loss.kd_weight is 0; set loss.kd_weight > 0 "
                              "or remove model.teacher_path")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


def parse_layer_spec(spec: str | int | list, num_layers: int) -> list[int]:
    """"14,15,16,17", "8-15", "upper_half", "all" (or a list of ints) -> sorted layer indices."""
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(num_layers))
    if text == "upper_half":
        return list(range(num_layers // 2, num_layers))
    if text == "lower_half":
        return list(range(num_layers // 2))
    indices: set[int] = set()
    for token in filter(None, (t.strip() for t in text.split(","))):
        try:
            bounds = [int(v) for v in token.split("-", 1)] if "-" in token.lstrip("-") else [int(token)] * 2
        except ValueError:
            raise ConfigError(f"npt.layers: cannot parse {token!r}; use e.g. '14,15', '8-15', "
                              "'upper_half' or 'all'") from None
        lo, hi = bounds
        if lo > hi:
            raise ConfigError(f"npt.layers: range {token!r} is reversed; write {hi}-{lo}")
        indices.update(range(lo, hi + 1))
    if not indices:
        raise ConfigError(f"npt.layers: {spec!r} selects no layers; use e.g. '14,15', '8-15', "
                          "'upper_half' or 'all'")
    bad = sorted(i for i in indices if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(f"npt.layers: layer {bad[0]} is out of range; the model has {num_layers} "
                          f"layers (valid 0-{num_layers - 1})")
    return sorted(indices)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a YAML value against a dataclass field annotation (ints widen to floats)."""
    origin = typing.get_origin(annotation)
    allowed = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    for typ in allowed:
        if typ is type(None) and value is None:
            return None
        base = typing.get_origin(typ) or typ
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. layers: 14 or curriculum written as a number
    names = " | ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, hint)
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data or {}, "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. schedule.total_steps=50")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe (or none: defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass a recipe such as configs/smollm2_demo.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return config_from_dict(apply_overrides(data, list(overrides or [])))
