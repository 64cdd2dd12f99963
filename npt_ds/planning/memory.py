"""Per-GPU memory of NPT training under DeepSpeed ZeRO 0-3, from a model shape alone: every term (frozen
base, NP params, gradients, optimizer state, activations, temp buffers, runtime reserve), FITS or not, and
one concrete change when it does not fit.  The derivation of each term, and how it meets DeepSpeed's own
estimator, is in ``docs/planner.md``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from ..config import ConfigError
from .shape import FP32, ModelShape, np_params_per_layer

GIB = 2 ** 30
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # deepspeed.precision -> trainable param/grad bytes
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # model.dtype -> bytes

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

    With ``trainable_params == total_params`` this is DeepSpeed's all-trainable estimate (see docs/planner.md).  ``offload_optimizer`` moves gradients' fp32 side and optimizer state to CPU (GPU 0);
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
    """Per-GPU activation bytes of one fused NPT training step (formulas in docs/planner.md).

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
    frozen_base: str = "partitioned"  # ZeRO-3: partitioned | resident | hpz | quantized (npt_ds.parallel.zero)
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
    """ZeRO-3 model states under `i.frozen_base` (see npt_ds.parallel.zero), from the partitioned ones.

    resident: every parameter persistent (whole base, teacher and NP params on every GPU; no gather buffer).
    hpz: + a secondary partition of the base within the node (1 / gpus_per_node of it).
    quantized: the frozen weights held as int8 (1 byte + an fp32 scale per row, as the shape's int8).
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
