"""Quantised frozen base (bitsandbytes int8 / nf4): what works with DeepSpeed, and the loading helpers.

Measured with bitsandbytes 0.50.2, deepspeed 0.19.8, transformers 5.23, torch 2.13 (CPU, 1 and 2 ranks):

* ZeRO 0, 1 and 2 train the NP components on an int8 or an nf4 base; the losses are identical across
  the stages.  The frozen base is replicated on every rank; only the NP state is sharded.
* ZeRO-3 + nf4 works and partitions the base: transformers loads a quantised model outside
  ``zero.Init`` and ``deepspeed.initialize`` then partitions every parameter.  The packed 4-bit codes
  are stored in the compute dtype (``bnb_4bit_quant_storage``), so they are an ordinary floating
  tensor to ZeRO-3, and the ``quant_state`` stays on the ``Params4bit`` object across gather/release.
  Losses match ZeRO-2 exactly (2 ranks), and checkpoint resume is exact.
* ZeRO-3 + int8 is refused.  ``Linear8bitLt`` moves ``weight.CB`` (a second reference to the whole
  int8 matrix) into its matmul state on the first forward and computes from that, so every rank keeps
  the full int8 base *plus* its ZeRO-3 partition: more memory than ZeRO-2, never less.
* ``deepspeed.precision: bf16`` is refused: DeepSpeed casts every floating parameter of the module to
  bf16, i.e. the NP components (which stay fp32 on a quantised base) and, for nf4 with a float32
  ``quant_storage``, the packed 4-bit codes themselves (the forward then fails on a shape mismatch).
  Use ``precision: fp32`` and ``model.dtype: bfloat16`` for bf16 base compute with fp32 NP components.
* fp16 (``deepspeed.precision`` or ``model.dtype``) is refused.

bitsandbytes on CPU, worth knowing: int8 layers compute weight-only (dequantise + fp matmul) in train
mode but quantise the activations to int8 too in eval mode (SmolLM2 ppl 38.6 vs 39.6 on one text), so
the model must be in train mode for training steps.  nf4 layers repack their weight in place for a
bf16 kernel on their first eval-mode forward (disabled by :func:`prepare_quantized_model`), and
dequantise wrongly when the input width is not a multiple of 64 (see :func:`nf4_unaligned_linears`).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from torch import nn
from transformers.integrations import deepspeed as hf_ds

from ..config import ConfigError, TrainConfig

ZERO_STAGES = {"int8": (0, 1, 2), "nf4": (0, 1, 2, 3)}  # stages that train with a quantised base
_INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"


def check_quantization_support(cfg: TrainConfig, zero_stage: int) -> None:
    """Raise a one-line ConfigError when a quantised base cannot train with this ZeRO stage / precision.

    Call it before loading the model, with the stage of the built DeepSpeed config
    (``ds_config["zero_optimization"]["stage"]``).
    """
    q = cfg.model.quantization
    if q == "none":
        return
    precision = cfg.deepspeed.precision
    if precision == "fp16" or cfg.model.dtype == "float16":
        key = "deepspeed.precision" if precision == "fp16" else "model.dtype"
        raise ConfigError(f"{key}: fp16 cannot be combined with model.quantization={q}; use deepspeed.precision: "
                          "fp32 with model.dtype: float32 or bfloat16")
    if precision == "bf16":
        raise ConfigError(f"deepspeed.precision: bf16 with model.quantization={q} would cast the NP components "
                          "(and nf4's packed weights) to bf16; use deepspeed.precision: fp32, with "
                          "model.dtype: bfloat16 for bf16 base compute")
    if zero_stage not in ZERO_STAGES[q]:
        raise ConfigError(f"deepspeed.zero_stage: ZeRO-{zero_stage} cannot partition an int8 base (bitsandbytes "
                          "keeps the whole int8 matrix on every rank); set deepspeed.zero_stage: 2, or use "
                          "model.quantization: nf4 with ZeRO-3")


@contextlib.contextmanager
def without_hf_zero3() -> Iterator[None]:
    """Hide an active ``HfDeepSpeedConfig`` so transformers builds a model unpartitioned.

    A quantised model is loaded outside ``zero.Init`` anyway; the tiny random Llama that is saved and
    reloaded through bitsandbytes must be materialised in full too (under ZeRO-3 its parameters would be
    0-size placeholders and the saved checkpoint empty).
    """
    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


class _OncePerMessage(logging.Filter):
    """Let each distinct record message through once (bitsandbytes logs a cast warning on every matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith("MatMul8bitLt: inputs will be cast"):
            return True
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def quiet_int8_cast_warning() -> None:
    """Log bitsandbytes' "inputs will be cast ... to float16" warning once instead of once per matmul."""
    log = logging.getLogger(_INT8_CAST_LOGGER)
    if not any(isinstance(f, _OncePerMessage) for f in log.filters):
        log.addFilter(_OncePerMessage())


def prepare_quantized_model(model: nn.Module) -> nn.Module:
    """Post-load fixes for a bitsandbytes base on CPU; returns the model.

    * nf4: turn off bitsandbytes' CPU inference repacking.  On AVX512-BF16 CPUs ``Linear4bit.forward``
      rewrites its weight in place into a packed layout (bf16 absmax) the first time it runs in eval
      mode without grad.  That fails for layers whose input width is not a multiple of the 64-element
      quantisation block (the tiny Llama's down_proj, 160), and elsewhere makes evaluation compute with
      other numerics than training.  Training and evaluation then share the dequantise + matmul path.
    * int8: see :func:`quiet_int8_cast_warning`.
    """
    try:
        import bitsandbytes as bnb  # lazy: only a quantised base needs it, and its import costs seconds
    except ImportError:  # pragma: no cover - quantised loading needs it anyway
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
        elif isinstance(module, bnb.nn.Linear8bitLt):
            quiet_int8_cast_warning()
    return model


NF4_BLOCKSIZE = 64  # transformers' BitsAndBytesConfig default (bnb_4bit_blocksize is not exposed)


def nf4_unaligned_linears(model_config, blocksize: int = NF4_BLOCKSIZE) -> list[str]:
    """Llama linear names (suffixes) whose input width is not a multiple of the nf4 block size.

    bitsandbytes 0.50.2's CPU ``dequantize_4bit`` kernel takes the blocks row by row, which is only
    right when each weight row (the input width) is a whole number of blocks; otherwise it dequantises
    with the wrong absmax (relative weight error 0.23-0.26 instead of 0.09, measured).  Real models
    (SmolLM2: 576 / 1536, Llama-3: 4096 / 14336) are aligned; the tiny test Llama's down_proj (160) is not.
    These layers are kept unquantised (``llm_int8_skip_modules``).
    """
    hidden = model_config.hidden_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    widths = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "gate_proj": hidden, "up_proj": hidden,
              "o_proj": model_config.num_attention_heads * head_dim, "down_proj": model_config.intermediate_size}
    return sorted(name for name, width in widths.items() if width % blocksize)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes linear layers in ``model`` (empty for an unquantised model)."""
    try:
        import bitsandbytes as bnb  # lazy: as above
    except ImportError:  # pragma: no cover
        return []
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]
