"""Per-GPU memory planner for NPT training under DeepSpeed ZeRO 0-3, from a model shape alone.

``npt-ds plan CONFIG.yaml --nodes N --gpus-per-node G --gpu-mem 80`` reads the run config, takes the
model's shape from a config.json (an HF directory, a config.json file, or a preset in
``npt_ds/shapes/``; no weights are read) and prints, per GPU, the bytes of every term:

    frozen base params  NP params  gradients  optimizer state  activations  temp buffers  runtime reserve

then FITS / DOES NOT FIT against the GPU memory, with one concrete suggestion when it does not fit.

Model states (``model_state_bytes``), per trainable parameter, Adam:

    precision   param  grad16  fp32 grad  fp32 master  m + v   (bytes)
    bf16/fp16     2      2        4           4          8      = 20
    fp32          4      4        0           0          8      = 16

ZeRO-1 partitions the fp32 grad copy, master and moments over the W = nodes * gpus_per_node ranks;
ZeRO-2 also the 16-bit grads; ZeRO-3 also the 16-bit params (frozen ones too) and adds a gathered-
parameter buffer for the largest single module (DeepSpeed's "largest layer"); the frozen base is
assumed partitioned like any parameter, quantised or not.  Under ZeRO-3 the fp32
grad copy exists for one optimizer sub-group at a time: ``4 * min(P/W, sub_group_size)``.  With every
parameter trainable this is DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs``:
``2*P + 18*P/W``; ``estimate_zero3_...``: ``18*P/W + 4*largest_layer``, which we meet as
``20*P/W + 2*largest_layer``); NPT's figures come from the same function with only the NP parameters
trainable, so the frozen base costs its storage bytes and nothing else.

Frozen base storage: DeepSpeed casts the module to bf16/fp16 under mixed precision, so 2 bytes per
parameter (fp32 precision: ``model.dtype``).  ``quantization`` applies to the decoder linears only
(bitsandbytes keeps embeddings, norms and lm_head in the compute dtype): int8 = 1 byte + one fp32
scale per output row; nf4 = 0.5 byte + one fp32 absmax per 64-element block (0.5625 byte).

Activations (``activation_bytes``) follow ``npt_ds.model.fused.fused_forward``: layers before the
first NPT layer and all teacher work run under ``no_grad`` and store nothing; the student side of each
NPT layer (and, when a student stream runs, every frozen layer after the first NPT layer) stores its
autograd tensors.  With N = micro_batch * seq_len tokens, b activation bytes (2 under bf16/fp16),
d, f = d_ffn, q = heads * head_dim, H heads, k = num_ranks, r = rank, per token:

    attention with grad   A_attn = 4d (RMSNorm keeps its fp32 input) + 4bq (SDPA keeps q, k, v, out;
                                   k and v counted at q width, i.e. after repeat_kv) + 4H (fp32 logsumexp)
    frozen decoder layer  A_dec  = A_attn + 4d + 3bf    (post-attention RMSNorm; SiLU input, SiLU output,
                                   up; frozen linears keep no input)
    NPT layer, retained   R_np   = b(5d + k)            attn, x, y, target, h_in and coef: the
                                   LayerOutput the loss reads
    NPT layer, internal   I_np   = b(2r + 2rk + k + 3f) r, q = x W_a_upᵀ, z = s r ⊗ coef, r G, s·coef, the
                                   modulated MLP's SiLU in/out and up (+ 3bf multiplicative, + 4d
                                   post-norm input with a student stream)
    A_np = R_np + I_np (+ A_attn with a student stream: the student's own attention)
    vectors               D_np   = b k(d + f)           v_a, v_b (+ bkf dual v_c, + bf multiplicative factor):
                                   on log steps one layer's at a time (reduced to stats at once), every
                                   NPT layer's when a guidance loss reads them (``keep_vectors``)

    stored      = N * (n_npt * A_np + n_student_layers * A_dec)
    stored_ckpt = N * (n_npt * (A_np - I_np) + n_student_layers * A_dec + max I_np)
    vectors     = N * D_np, or N * n_npt * D_np with keep_vectors (in the total: a log step is the peak)

``model.activation_checkpointing`` recomputes each NPT layer's student MLP in backward (the trainer
sets ``NPTDecoderLayer.checkpoint_student``): only I_np is dropped, and one layer's I_np comes back
during its backward.  The student attention and the frozen student layers are not recomputed.

Plus, always: the live hidden streams ``N * b * d`` per stream, a one-layer working set
``N * 2b(4q + 3f)`` (forward intermediates, then that layer's activation gradients), with a student
stream the final norms (``N * (4d + 2bd)``) and, when KD or logit fidelity is on, both logits and the
fp32 loss tensors ``N * V * (2b + 12)``.  Eager attention (T x T scores) is not modelled: use sdpa.
A student stream runs when ``schedule.mode`` is not single_layer or a fidelity / KD loss is on
(as ``npt_ds.trainer`` decides); logits when KD or logit fidelity is on.

Temp buffers: ZeRO-3 gathered params (largest module) + prefetch bucket (``stage3_prefetch_bucket_size``,
5e7 elements); the gradient reduce bucket ``min(reduce_bucket_size, P)`` (5e8); ZeRO-1/2 the allgather
bucket ``min(allgather_bucket_size, P)``.  Runtime reserve: CUDA context, NCCL, allocator slack (1.5 GiB).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, TrainConfig, load_config

GIB = 2 ** 30
SHAPES_DIR = Path(__file__).with_name("shapes")
PRESET_ALIASES = {"smollm2": "smollm2-135m"}  # model.path names that map to a shipped shape

PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # deepspeed.precision -> trainable param/grad bytes
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # model.dtype -> bytes
FP32 = 4
NF4_BYTES = 0.5 + FP32 / 64  # 4-bit code + fp32 absmax per 64-element block
INT8_BYTES = 1.0  # + fp32 scale per output row, added per matrix

# DeepSpeed zero_optimization defaults (deepspeed/runtime/zero/config.py)
DS_REDUCE_BUCKET = int(5e8)
DS_ALLGATHER_BUCKET = int(5e8)
DS_PREFETCH_BUCKET = int(5e7)
DS_SUB_GROUP = int(1e9)
RUNTIME_RESERVE_GIB = 1.5

TERM_LABELS = {
    "frozen_base_params": "frozen base params",
    "teacher_params": "KD teacher params",
    "np_params": "NP params",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "temp_buffers": "temp buffers",
    "runtime_reserve": "runtime reserve",
}
FIXED_TERMS = ("runtime_reserve",)  # never named as "the largest term"


# --------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style causal LM, as read from an HF config.json."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model") -> "ModelShape":
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise ConfigError(f"model config {name!r} lacks {missing[0]!r}; give a Llama config.json")
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(name=name, hidden_size=d, intermediate_size=int(cfg["intermediate_size"]),
                   num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
                   num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or d // heads), vocab_size=int(cfg["vocab_size"]),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", False)),
                   mlp_bias=bool(cfg.get("mlp_bias", False)))

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_linears(self) -> list[tuple[int, int, bool]]:
        """(in_features, out_features, has_bias) of q, k, v, o, gate, up, down in one decoder layer."""
        d, f, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        ab, mb = self.attention_bias, self.mlp_bias
        return [(d, q, ab), (d, kv, ab), (d, kv, ab), (q, d, ab), (d, f, mb), (d, f, mb), (f, d, mb)]

    def layer_params(self) -> int:
        """One decoder layer: seven linears (+ biases) and two RMSNorm weights."""
        return sum(i * o + (o if b else 0) for i, o, b in self.layer_linears()) + 2 * self.hidden_size

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        """embed + L decoder layers + final norm + lm_head (untied) = ``sum(p.numel())`` of the HF model."""
        return (self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size
                + self.lm_head_params())

    def largest_module_params(self) -> int:
        """Most parameters held directly by one module (DeepSpeed's ``largest_layer_params``)."""
        return max([self.embedding_params(), self.lm_head_params()]
                   + [i * o + (o if b else 0) for i, o, b in self.layer_linears()])

    def base_bytes(self, quantization: str = "none", elem_bytes: float = 2) -> float:
        """Storage bytes of the whole base; ``quantization`` covers the decoder linears' weights only."""
        linear_weights = sum(i * o for i, o, _ in self.layer_linears()) * self.num_layers
        rest = self.total_params() - linear_weights
        if quantization == "none":
            quant = linear_weights * elem_bytes
        elif quantization == "int8":
            quant = self.num_layers * sum(i * o * INT8_BYTES + FP32 * o for i, o, _ in self.layer_linears())
        elif quantization == "nf4":
            quant = linear_weights * NF4_BYTES
        else:
            raise ConfigError(f"model.quantization: {quantization!r} is not one of none, int8, nf4")
        return quant + rest * elem_bytes


def list_presets() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config {str(path)!r} is not readable JSON ({exc})") from None


def load_shape(path: str, tiny_overrides: dict | None = None) -> ModelShape:
    """Shape of ``model.path``: an HF dir with config.json, a config.json (or .safetensors with a
    config.json beside it), ``tiny`` (npt_ds's tiny random Llama + ``model.tiny``), or a preset name
    from ``npt_ds/shapes/`` (also matched by an HF repo id's basename, e.g. meta-llama/Llama-3.1-8B)."""
    if path == "tiny":
        from .model.loading import TINY_DEFAULTS

        return ModelShape.from_hf_config({**TINY_DEFAULTS, **(tiny_overrides or {})}, "tiny")
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path {path!r} has no config.json; the planner needs the model's "
                              "config.json (no weights)")
        return ModelShape.from_hf_config(_read_json(p / "config.json"), p.name)
    if p.is_file():
        cfg_file = p if p.suffix == ".json" else p.parent / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"model.path {path!r}: put the model's config.json beside it, or give a "
                              f"preset: {', '.join(list_presets())}")
        return ModelShape.from_hf_config(_read_json(cfg_file), p.stem if p.suffix == ".json" else p.parent.name)
    base = p.name.lower()
    for cand in (path, PRESET_ALIASES.get(path, ""), base, base.removesuffix("-instruct")):
        if cand and (SHAPES_DIR / f"{cand}.json").is_file():
            return ModelShape.from_hf_config(_read_json(SHAPES_DIR / f"{cand}.json"), cand)
    raise ConfigError(f"model.path {path!r} not found; give an HF directory or config.json, or a preset: "
                      f"{', '.join(list_presets())}")


def np_params_per_layer(d_model: int, d_ffn: int, rank: int, num_ranks: int, *, dual: bool = False,
                        multiplicative: bool = False, down_bias: bool = False) -> int:
    """NP component of one layer: W_down (d, r) + W_a_up (r, k, d) + W_b_up (r, k, f)
    [+ W_c_up (r, k, f) if dual] [+ W_m (r, f) if multiplicative] [+ b_down (r) if down_bias]."""
    n = d_model * rank + num_ranks * rank * (d_model + d_ffn) + (rank if down_bias else 0)
    if dual:
        n += num_ranks * rank * d_ffn
    if multiplicative:
        n += rank * d_ffn
    return n


# --------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of parameters, gradients, optimizer state and the ZeRO-3 gathered-module buffer."""

    frozen_params: float
    trainable_params: float
    gradients: float
    optimizer_state: float
    gathered_params: float

    @property
    def total(self) -> float:
        return (self.frozen_params + self.trainable_params + self.gradients + self.optimizer_state
                + self.gathered_params)


def model_state_bytes(total_params: int, trainable_params: int, *, zero_stage: int, world_size: int,
                      precision: str = "bf16", frozen_bytes: float | None = None,
                      largest_layer_params: int = 0, largest_layer_bytes: float | None = None,
                      sub_group_size: int = DS_SUB_GROUP, offload_optimizer: bool = False,
                      offload_param: bool = False) -> ModelStates:
    """Per-GPU model-state bytes for ``trainable_params`` Adam-trained params of ``total_params``.

    ``frozen_bytes`` is the storage of the ``total - trainable`` frozen params (default: the param
    dtype of ``precision``).  Per trainable param (P), W = world size, p = param bytes:

      params     p*P           (ZeRO-3: /W)          frozen: frozen_bytes (ZeRO-3: /W)
      gradients  p*P + 4*P     16-bit grads /W from ZeRO-2; fp32 copy /W from ZeRO-1, under ZeRO-3
                               one sub-group: 4*min(P/W, sub_group_size); fp32 precision: no copy
      optimizer  (4 + 8)*P     fp32 master (mixed precision only) + Adam m, v; /W from ZeRO-1
      gathered   ZeRO-3 only:  p * largest_layer_params (one module all-gathered at a time), or
                               ``largest_layer_bytes`` when given (e.g. a bf16 embedding beside an nf4 base)

    With ``trainable_params == total_params`` this is DeepSpeed's all-trainable estimate (see the module
    docstring).  ``offload_optimizer`` moves gradients' fp32 side and optimizer state to CPU (GPU 0);
    ``offload_param`` (ZeRO-3) moves the partitioned params to CPU.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if precision not in PARAM_BYTES:
        raise ConfigError(f"deepspeed.precision: {precision!r} is not one of fp32, bf16, fp16")
    if not 0 <= trainable_params <= total_params:
        raise ValueError("need 0 <= trainable_params <= total_params")
    w = max(1, int(world_size))
    p = PARAM_BYTES[precision]
    mixed = precision != "fp32"
    frozen = (total_params - trainable_params) * p if frozen_bytes is None else float(frozen_bytes)
    train = float(p * trainable_params)
    if zero_stage == 3:
        frozen, train = (0.0, 0.0) if offload_param else (frozen / w, train / w)
    grad16 = p * trainable_params / (w if zero_stage >= 2 else 1)
    fp32_grad = 0.0
    if mixed:
        if zero_stage == 0:
            fp32_grad = FP32 * trainable_params
        elif zero_stage in (1, 2):
            fp32_grad = FP32 * trainable_params / w
        else:
            fp32_grad = FP32 * min(trainable_params / w, sub_group_size)
    optim = ((FP32 if mixed else 0) + 2 * FP32) * trainable_params / (w if zero_stage >= 1 else 1)
    if offload_optimizer and zero_stage >= 1:
        grad16, fp32_grad, optim = (0.0 if zero_stage >= 2 else grad16), 0.0, 0.0
    gathered = 0.0
    if zero_stage == 3:
        gathered = p * largest_layer_params if largest_layer_bytes is None else float(largest_layer_bytes)
    return ModelStates(frozen, train, grad16 + fp32_grad, optim, gathered)


# --------------------------------------------------------------------------- activations
def activation_bytes(shape: ModelShape, npt_layers: Sequence[int], *, seq_len: int, micro_batch_size: int,
                     rank: int, num_ranks: int, dual: bool = False, multiplicative: bool = False,
                     act_bytes: float = 2, checkpointing: bool = False, student_stream: bool = False,
                     want_logits: bool = False, keep_vectors: bool = False) -> dict[str, float]:
    """Per-GPU activation bytes of one fused NPT training step (formulas in the module docstring).

    ``student_stream``: the student's own hidden state runs through every layer after the first NPT
    layer (schedule.mode other than single_layer, fidelity or KD); otherwise each NPT layer reads the
    teacher state and nothing after the last NPT layer runs.  ``keep_vectors``: a guidance loss keeps every
    NPT layer's v_a, v_b for backward.  Returns the parts and their ``total``.
    """
    if not npt_layers:
        raise ConfigError("npt.layers selects no layers")
    b = float(act_bytes)
    d, f, q, H, V = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.num_heads, shape.vocab_size
    k, r = num_ranks, rank
    n_tok = seq_len * micro_batch_size
    layers = set(npt_layers)
    first = min(layers)
    n_npt = len(layers)
    n_student = sum(1 for i in range(first + 1, shape.num_layers) if i not in layers) if student_stream else 0

    a_attn = 4 * d + 4 * b * q + 4 * H
    a_dec = a_attn + 4 * d + 3 * b * f
    retained = b * (5 * d + k)
    internal = b * (2 * r + 2 * r * k + k + 3 * f) + (3 * b * f if multiplicative else 0.0) + \
        (4 * d if student_stream else 0.0)
    diagnostic = b * k * (d + f) + (b * k * f if dual else 0.0) + (b * f if multiplicative else 0.0)
    a_np = retained + internal + (a_attn if student_stream else 0.0)

    if checkpointing:
        per_layer = n_npt * (a_np - internal) + n_student * a_dec
        recompute = internal
    else:
        per_layer = n_npt * a_np + n_student * a_dec
        recompute = 0.0
    parts = {
        "npt_and_student_layers": n_tok * per_layer,
        "vectors": n_tok * diagnostic * (n_npt if keep_vectors else 1),
        "recompute_peak": n_tok * recompute,
        "hidden_streams": n_tok * b * d * (2 if student_stream else 1),
        "working_set": n_tok * 2 * b * (4 * q + 3 * f),
        "final_norm": n_tok * (4 * d + 2 * b * d) if student_stream else 0.0,
        "logits": n_tok * V * (2 * b + 12) if want_logits else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class DeepSpeedKnobs:
    """The zero_optimization values of the DeepSpeed JSON that change memory."""

    stage: int | None = None
    reduce_bucket_size: int = DS_REDUCE_BUCKET
    allgather_bucket_size: int = DS_ALLGATHER_BUCKET
    prefetch_bucket_size: int = DS_PREFETCH_BUCKET
    sub_group_size: int = DS_SUB_GROUP
    offload_optimizer: bool = False
    offload_param: bool = False
    source: str = "defaults"


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan depends on (``replace()`` one field to ask "what if")."""

    shape: ModelShape
    npt_layers: tuple[int, ...]
    rank: int = 64
    num_ranks: int = 1
    dual: bool = False
    multiplicative: bool = False
    down_bias: bool = False
    seq_len: int = 128
    micro_batch_size: int = 1
    precision: str = "bf16"
    model_dtype: str = "float32"
    quantization: str = "none"
    zero_stage: int = 3
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_mem_gib: float = 80.0
    activation_checkpointing: bool = False
    student_stream: bool = False  # the student's own hidden state runs past the first NPT layer
    want_logits: bool = False  # teacher + student logits are materialised (KD / logit fidelity)
    keep_vectors: bool = False  # a guidance loss keeps every NPT layer's v_a, v_b
    teacher_shape: ModelShape | None = None  # a KD teacher of another width (model.teacher_path)
    frozen_base: str = "partitioned"  # ZeRO-3: partitioned | resident | hpz | quantized (npt_ds.hardware)
    ds: DeepSpeedKnobs = field(default_factory=DeepSpeedKnobs)
    reserve_gib: float = RUNTIME_RESERVE_GIB

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Plan:
    """Per-GPU terms of one :class:`PlanInputs`; ``fits`` compares their sum with the GPU memory."""

    inputs: PlanInputs
    terms: dict[str, float]  # per-GPU bytes, in display order
    params: dict[str, int]
    activations: dict[str, float]
    activations_alt: float  # the activation total with checkpointing toggled
    suggestion: str | None = None

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def gpu_mem_bytes(self) -> float:
        return self.inputs.gpu_mem_gib * GIB

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem_bytes

    @property
    def largest_term(self) -> str:
        return max((k for k in self.terms if k not in FIXED_TERMS), key=lambda k: self.terms[k])

    def to_dict(self) -> dict[str, Any]:
        i = self.inputs
        ckpt = i.activation_checkpointing
        return {
            "fits": self.fits,
            "total_gib": _gib(self.total),
            "gpu_mem_gib": i.gpu_mem_gib,
            "headroom_gib": _gib(self.gpu_mem_bytes - self.total),
            "largest_term": self.largest_term,
            "suggestion": self.suggestion,
            "terms": {k: {"bytes": int(round(v)), "gib": _gib(v)} for k, v in self.terms.items()},
            "activations": {
                "with_checkpointing": _gib(self.terms["activations"] if ckpt else self.activations_alt),
                "without_checkpointing": _gib(self.activations_alt if ckpt else self.terms["activations"]),
                "parts_gib": {k: _gib(v) for k, v in self.activations.items()},
            },
            "params": self.params,
            "inputs": {
                "model": i.shape.name, "npt_layers": list(i.npt_layers), "rank": i.rank,
                "num_ranks": i.num_ranks, "dual": i.dual, "multiplicative": i.multiplicative,
                "seq_len": i.seq_len, "micro_batch_size": i.micro_batch_size, "precision": i.precision,
                "model_dtype": i.model_dtype, "quantization": i.quantization, "zero_stage": i.zero_stage,
                "nodes": i.nodes, "gpus_per_node": i.gpus_per_node, "world_size": i.world_size,
                "activation_checkpointing": ckpt, "student_stream": i.student_stream,
                "want_logits": i.want_logits, "teacher": i.teacher_shape.name if i.teacher_shape else None,
                "deepspeed": asdict(i.ds), "reserve_gib": i.reserve_gib,
            },
        }


def _gib(n: float) -> float:
    return round(n / GIB, 3)


def base_elem_bytes(precision: str, model_dtype: str) -> int:
    """Bytes per unquantised base element: DeepSpeed casts the module to 16 bits under bf16/fp16."""
    return PARAM_BYTES[precision] if precision != "fp32" else DTYPE_BYTES[model_dtype]


def plan_memory(inputs: PlanInputs) -> Plan:
    """Compute every per-GPU term for ``inputs`` (no suggestion; see :func:`make_plan`)."""
    i = inputs
    shape = i.shape
    elem = base_elem_bytes(i.precision, i.model_dtype)
    p_bytes = PARAM_BYTES[i.precision]
    base_total = shape.total_params()
    per_layer_np = np_params_per_layer(shape.hidden_size, shape.intermediate_size, i.rank, i.num_ranks,
                                       dual=i.dual, multiplicative=i.multiplicative, down_bias=i.down_bias)
    np_total = per_layer_np * len(i.npt_layers)
    projector = 0
    teacher_total = 0
    if i.teacher_shape is not None:
        teacher_total = i.teacher_shape.total_params()
        if i.teacher_shape.hidden_size != shape.hidden_size:  # LogitProjector(teacher_dim, student_dim)
            projector = i.teacher_shape.hidden_size * shape.hidden_size + shape.hidden_size
    trainable = np_total + projector
    frozen_bytes = shape.base_bytes(i.quantization, elem)
    largest_bytes = max(shape.largest_module_params() * elem, per_layer_np * p_bytes,
                        i.teacher_shape.largest_module_params() * elem if i.teacher_shape else 0)
    states = model_state_bytes(base_total + trainable, trainable, zero_stage=i.zero_stage,
                               world_size=i.world_size, precision=i.precision, frozen_bytes=frozen_bytes,
                               largest_layer_bytes=largest_bytes,
                               sub_group_size=i.ds.sub_group_size, offload_optimizer=i.ds.offload_optimizer,
                               offload_param=i.ds.offload_param)
    teacher_bytes = 0.0
    if i.teacher_shape is not None:
        teacher_bytes = i.teacher_shape.base_bytes(i.quantization, elem)
        if i.zero_stage == 3:
            teacher_bytes = 0.0 if i.ds.offload_param else teacher_bytes / i.world_size
    if i.zero_stage == 3 and not i.ds.offload_param:
        states, teacher_bytes = _frozen_base_states(i, states, frozen_bytes, teacher_bytes, trainable * p_bytes)

    act_kwargs = dict(seq_len=i.seq_len, micro_batch_size=i.micro_batch_size, rank=i.rank,
                      num_ranks=i.num_ranks, dual=i.dual, multiplicative=i.multiplicative,
                      act_bytes=base_elem_bytes(i.precision, i.model_dtype),
                      student_stream=i.student_stream, want_logits=i.want_logits, keep_vectors=i.keep_vectors)
    acts = activation_bytes(shape, i.npt_layers, checkpointing=i.activation_checkpointing, **act_kwargs)
    alt = activation_bytes(shape, i.npt_layers, checkpointing=not i.activation_checkpointing, **act_kwargs)

    temp = states.gathered_params
    if i.zero_stage == 3 and i.frozen_base != "resident":
        temp += min(i.ds.prefetch_bucket_size, base_total + trainable) * elem
    if trainable:
        temp += min(i.ds.reduce_bucket_size, trainable) * p_bytes
        if i.zero_stage in (1, 2):
            temp += min(i.ds.allgather_bucket_size, trainable) * p_bytes

    terms: dict[str, float] = {"frozen_base_params": states.frozen_params}
    if i.teacher_shape is not None:
        terms["teacher_params"] = teacher_bytes
    terms.update(np_params=states.trainable_params, gradients=states.gradients,
                 optimizer_state=states.optimizer_state, activations=acts["total"], temp_buffers=temp,
                 runtime_reserve=i.reserve_gib * GIB)
    params = {"base_total": base_total, "np_per_layer": per_layer_np, "np_total": np_total,
              "logit_projector": projector, "teacher_total": teacher_total, "trainable": trainable,
              "largest_module": shape.largest_module_params()}
    return Plan(i, terms, params, {k: v for k, v in acts.items() if k != "total"}, alt["total"])


def _frozen_base_states(i: PlanInputs, states: ModelStates, frozen_bytes: float, teacher_bytes: float,
                        trainable_bytes: float) -> tuple[ModelStates, float]:
    """ZeRO-3 model states under `i.frozen_base` (see npt_ds.hardware), from the partitioned ones.

    resident: every parameter persistent (whole base, teacher and NP params on every GPU; no gather buffer).
    hpz: + a secondary partition of the base within the node (1 / gpus_per_node of it).
    quantized: the frozen weights held as int8 (1 byte + an fp32 scale per row, as npt_ds.plan's int8).
    """
    w, g = i.world_size, i.gpus_per_node
    if i.frozen_base == "resident":
        return replace(states, frozen_params=frozen_bytes, trainable_params=trainable_bytes,
                       gathered_params=0.0), teacher_bytes * w
    if i.frozen_base == "hpz":
        return replace(states, frozen_params=frozen_bytes / w + frozen_bytes / g), \
            teacher_bytes + teacher_bytes * w / g
    if i.frozen_base == "quantized":
        int8 = i.shape.base_bytes("int8", base_elem_bytes(i.precision, i.model_dtype))
        return replace(states, frozen_params=int8 / w), teacher_bytes
    return states, teacher_bytes


# --------------------------------------------------------------------------- suggestions
NODE_STEPS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
SEARCHED = ("nodes", "mbs", "seq")  # changes with a size picked by search

# which changes help which term most, best first
_PREFERENCE = {
    "frozen_base_params": ("zero3", "nf4", "nodes", "bf16", "ckpt", "mbs", "seq"),
    "teacher_params": ("zero3", "nf4", "nodes", "bf16", "ckpt", "mbs", "seq"),
    "np_params": ("zero3", "nodes", "bf16", "nf4", "ckpt", "mbs", "seq"),
    "gradients": ("zero3", "nodes", "bf16", "nf4", "ckpt", "mbs", "seq"),
    "optimizer_state": ("zero3", "nodes", "bf16", "nf4", "ckpt", "mbs", "seq"),
    "activations": ("ckpt", "mbs", "seq", "bf16", "zero3", "nf4", "nodes"),
    "temp_buffers": ("bf16", "nf4", "zero3", "ckpt", "mbs", "seq", "nodes"),
}


def _fits(x: PlanInputs) -> bool:
    return plan_memory(x).fits


def _search(options: Sequence[PlanInputs], need_fit: bool) -> PlanInputs | None:
    """First option that fits; else (need_fit False) the last, i.e. the biggest step."""
    for trial in options:
        if _fits(trial):
            return trial
    return None if need_fit or not options else options[-1]


def _change(key: str, x: PlanInputs, need_fit: bool) -> tuple[str, PlanInputs] | None:
    """One change of kind ``key`` applied to ``x`` as (advice, new inputs), or None if it does not apply.

    Searched changes (nodes, micro-batch, seq_len) take the smallest step that fits; with
    ``need_fit=False`` and no step fitting, the biggest step.
    """
    if key == "zero3" and x.zero_stage < 3 and x.world_size > 1:
        return "raise the ZeRO stage to 3 (--zero-stage 3)", replace(x, zero_stage=3)
    if key == "ckpt" and not x.activation_checkpointing:
        return ("enable activation checkpointing (--activation-checkpointing)",
                replace(x, activation_checkpointing=True))
    if key == "nf4" and x.quantization != "nf4":
        return ("quantise the frozen base to nf4 (--override model.quantization=nf4 deepspeed.precision=fp32 "
                "model.dtype=bfloat16)", replace(x, quantization="nf4", precision="fp32", model_dtype="bfloat16"))
    if key == "bf16" and x.precision == "fp32" and x.quantization == "none":
        return "train in bf16 (--override deepspeed.precision=bf16)", replace(x, precision="bf16")
    if key == "nodes" and x.zero_stage >= 1:
        t = _search([replace(x, nodes=n) for n in NODE_STEPS if n > x.nodes], need_fit)
        return (f"add nodes: --nodes {t.nodes} ({t.world_size} GPUs)", t) if t else None
    if key == "mbs" and x.micro_batch_size > 1:
        sizes = sorted({max(1, x.micro_batch_size // 2 ** j) for j in range(1, 16)}, reverse=True)
        t = _search([replace(x, micro_batch_size=m) for m in sizes], need_fit)
        return (f"lower data.micro_batch_size to {t.micro_batch_size} and raise optim.grad_accum to keep "
                f"the batch (--override data.micro_batch_size={t.micro_batch_size})", t) if t else None
    if key == "seq" and x.seq_len > 256:
        lens = sorted({max(256, x.seq_len // 2 ** j) for j in range(1, 16)}, reverse=True)
        t = _search([replace(x, seq_len=s) for s in lens], need_fit)
        return (f"lower data.seq_len to {t.seq_len} (--override data.seq_len={t.seq_len})", t) if t else None
    return None


def suggest(plan: Plan) -> str | None:
    """None when the plan fits; else one line: the largest term and the first single change (ordered by
    relevance to that term) that makes it fit, or the shortest relevance-ordered stack of changes."""
    if plan.fits:
        return None
    largest = plan.largest_term
    head = f"does not fit: largest term is {TERM_LABELS[largest]} ({plan.terms[largest] / GIB:.1f} GiB)"
    order = _PREFERENCE.get(largest, ())
    for key in order:
        got = _change(key, plan.inputs, need_fit=True)
        if got is not None and _fits(got[1]):
            return f"{head}; try {got[0]}: {plan_memory(got[1]).total / GIB:.1f} GiB per GPU"
    # no single change suffices: stack the fixed changes in order of relevance, after each one trying
    # the smallest fitting step of a searched change (nodes, micro-batch, seq_len); last, their biggest
    fixed = [k for k in order if k not in SEARCHED]
    searched = [k for k in order if k in SEARCHED]
    x, steps = plan.inputs, []
    for key in [*fixed, None]:
        for s in searched:
            got = _change(s, x, need_fit=True)
            if got is not None:
                return f"{head}; try {' + '.join([*steps, got[0]])}: {plan_memory(got[1]).total / GIB:.1f} GiB per GPU"
        got = _change(key, x, need_fit=False) if key else None
        if got is not None:
            steps.append(got[0])
            x = got[1]
            if _fits(x):
                return f"{head}; try {' + '.join(steps)}: {plan_memory(x).total / GIB:.1f} GiB per GPU"
    for s in searched:
        got = _change(s, x, need_fit=False)
        if got is not None:
            steps.append(got[0])
            x = got[1]
            if _fits(x):
                return f"{head}; try {' + '.join(steps)}: {plan_memory(x).total / GIB:.1f} GiB per GPU"
    return (f"{head}; try GPUs with more memory: even {' + '.join(steps) or 'no listed change'} leaves "
            f"{plan_memory(x).total / GIB:.1f} GiB per GPU")


def make_plan(inputs: PlanInputs) -> Plan:
    """:func:`plan_memory` plus the does-not-fit suggestion."""
    plan = plan_memory(inputs)
    plan.suggestion = suggest(plan)
    return plan


# --------------------------------------------------------------------------- from a TrainConfig
def read_deepspeed_knobs(path: str, search_dirs: Sequence[Path] = ()) -> DeepSpeedKnobs:
    """zero_optimization knobs of the DeepSpeed JSON ``path`` (tried as given, then under each of
    ``search_dirs``); an absent file gives DeepSpeed's defaults with stage None (the planner then uses 3)."""
    candidates = [Path(path).expanduser()] + [Path(d) / path for d in search_dirs]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return DeepSpeedKnobs(source=f"{path} not found: DeepSpeed defaults")
    data = _read_json(found)
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
    given, then under the repository root.  Student stream and logits: as ``npt_ds.trainer`` decides.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    if gpu_mem_gib <= 0:
        raise ConfigError("--gpu-mem must be > 0 (GiB per GPU)")
    shape = load_shape(cfg.model.path, cfg.model.tiny)
    teacher = None
    if cfg.model.teacher_path:
        teacher = load_shape(cfg.model.teacher_path, cfg.model.teacher_tiny)
    from .losses import GUIDANCE  # lazy: torch/transformers only when planning
    from .model.convert import parse_layer_spec

    layers = tuple(parse_layer_spec(cfg.npt.layers, shape.num_layers))
    repo_root = Path(__file__).resolve().parent.parent
    ds = read_deepspeed_knobs(cfg.deepspeed.config, [repo_root])
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
        keep_vectors=any(getattr(loss, name) > 0 for name in GUIDANCE.values()))


# --------------------------------------------------------------------------- CLI
def format_plan(plan: Plan) -> str:
    """The human-readable table."""
    i = plan.inputs
    s = i.shape
    layers = _format_layers(i.npt_layers)
    lines = [
        f"npt-ds plan: {s.name} ({_count(plan.params['base_total'])} params, {s.num_layers} layers), "
        f"NPT layers {layers} ({len(i.npt_layers)}), rank {i.rank} x {i.num_ranks} ranks "
        f"= {_count(plan.params['trainable'])} trainable",
        f"ZeRO-{i.zero_stage}, {i.precision}, base {i.quantization if i.quantization != 'none' else 'unquantised'}, "
        f"{i.nodes} node(s) x {i.gpus_per_node} GPU(s) = {i.world_size}, seq {i.seq_len} x micro-batch "
        f"{i.micro_batch_size}, activation checkpointing {'on' if i.activation_checkpointing else 'off'}, "
        f"student stream {'on' if i.student_stream else 'off'}, logits {'on' if i.want_logits else 'off'}",
        "",
        f"{'per GPU':<22}{'GiB':>10}",
        "-" * 32,
    ]
    for key, value in plan.terms.items():
        lines.append(f"{TERM_LABELS[key]:<22}{value / GIB:>10.2f}")
    lines += ["-" * 32, f"{'total':<22}{plan.total / GIB:>10.2f}", f"{'GPU memory':<22}{i.gpu_mem_gib:>10.2f}"]
    alt = "with" if not i.activation_checkpointing else "without"
    lines.append(f"(activations {alt} checkpointing: {plan.activations_alt / GIB:.2f} GiB)")
    if plan.fits:
        lines.append(f"FITS (headroom {(plan.gpu_mem_bytes - plan.total) / GIB:.2f} GiB)")
    else:
        lines.append(f"DOES NOT FIT (short by {(plan.total - plan.gpu_mem_bytes) / GIB:.2f} GiB)")
        lines.append(plan.suggestion or suggest(plan) or "")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else str(n)


def _format_layers(layers: Sequence[int]) -> str:
    out, start = [], None
    seq = sorted(layers)
    for n, v in enumerate(seq):
        if start is None:
            start = v
        if n + 1 == len(seq) or seq[n + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def add_plan_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plan`` on an ``argparse`` subparsers object; ``args.func`` is :func:`run_plan`."""
    p = subparsers.add_parser("plan", help="per-GPU memory plan for a config (no weights, no GPU)",
                              description="Estimate per-GPU memory of NPT training under DeepSpeed "
                                          "ZeRO from the config and the model's config.json alone.")
    p.add_argument("config", metavar="CONFIG.yaml", help="run recipe")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0,
                   help="memory per GPU in GiB (default 80; an '80 GB' H100 shows 79.6 GiB to CUDA)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="override deepspeed.zero_stage / the DeepSpeed JSON's stage")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="override model.activation_checkpointing")
    p.add_argument("--override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. data.seq_len=4096 (repeatable)")
    from .step_time import DEFAULT_LINK_GBPS, DEFAULT_MFU, DEFAULT_PEAK_TFLOPS

    p.add_argument("--link-gbps", default=",".join(f"{v:g}" for v in DEFAULT_LINK_GBPS), metavar="INTRA,INTER",
                   help="per-GPU link bandwidths in Gbit/s for the step-time table (default %(default)s: NVLink 4, "
                        "one 400G InfiniBand port per GPU)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="GPU peak (default %(default)s: H100 dense bf16)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation assumed (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON dict")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; 0 = fits, 1 = does not fit, 2 = bad config / arguments."""
    try:
        cfg = load_config(args.config, args.override)
        inputs = inputs_from_config(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                    gpu_mem_gib=args.gpu_mem, zero_stage=args.zero_stage,
                                    activation_checkpointing=args.activation_checkpointing)
        plan = make_plan(inputs)
        links = _link_gbps(args.link_gbps)
        from .step_time import format_prediction, predict, recommend

        rows = predict(inputs, link_gbps=links, grad_accum=cfg.optim.grad_accum, peak_tflops=args.peak_tflops,
                       mfu=args.mfu)
        recommended = recommend(rows)
    except ConfigError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}))
        else:
            print(f"error: {exc}")
        return 2
    if args.json:
        print(json.dumps({**plan.to_dict(), "frozen_base_modes": rows,
                          "recommended_frozen_base": {"mode": recommended[0], "why": recommended[1]}}, indent=2))
    else:
        print(format_plan(plan))
        print()
        print(format_prediction(rows, recommended, links, args.peak_tflops, args.mfu))
    return 0 if plan.fits else 1


def _link_gbps(text: str) -> tuple[float, float]:
    try:
        intra, inter = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--link-gbps: {text!r} is not INTRA,INTER in Gbit/s, e.g. 3600,400") from None
    if intra <= 0 or inter <= 0:
        raise ConfigError("--link-gbps: both bandwidths must be > 0")
    return intra, inter


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m npt_ds.plan CONFIG.yaml ...``."""
    parser = argparse.ArgumentParser(prog="npt-ds")
    add_plan_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
