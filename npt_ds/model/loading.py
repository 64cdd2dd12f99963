"""Load the frozen base: the SmolLM2 asset, an HF directory, a safetensors or GGUF file, or a tiny random Llama."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig

from ..assets import smollm2_hf_dir
from ..config import TINY_DEFAULTS, ConfigError, ModelConfig
from ..parallel.groups import gpu_index
from .quant import nf4_unaligned_linears, prepare_quantized_model, without_hf_zero3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255), eos 256: a dependency-free tokenizer for tiny models."""

    eos_token_id = 256
    bos_token_id = None
    pad_token_id = 257
    vocab_size = 258
    name_or_path = "bytes"

    def get_vocab(self) -> dict[str, int]:
        return {**{f"<0x{i:02X}>": i for i in range(256)}, "</s>": 256, "<pad>": 257}

    def __call__(self, texts, **_):
        single = isinstance(texts, str)
        ids = [list(t.encode("utf-8")) for t in ([texts] if single else texts)]
        return {"input_ids": ids[0] if single else ids}

    def decode(self, ids, **_) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_llama_config(overrides: dict | None = None):
    params = {**TINY_DEFAULTS, **(overrides or {})}
    unknown = [k for k in params if not hasattr(LlamaConfig(), k)]
    if unknown:
        raise ConfigError(f"model.tiny: unknown LlamaConfig key {unknown[0]!r}")
    return LlamaConfig(**params)


def tiny_llama(overrides: dict | None = None, seed: int = 0) -> nn.Module:
    """A small random LlamaForCausalLM (deterministic for a seed) for tests and dry runs.

    Always built whole, also under ZeRO-3's HfDeepSpeedConfig (the engine partitions it later): built partitioned,
    its random weights would come out otherwise, and every frozen-base mode and ZeRO stage must start alike."""
    config = tiny_llama_config(overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]), without_hf_zero3():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def _missing_path(path: str) -> ConfigError:
    return ConfigError(f"model.path {path!r} not found; give an HF directory, a .safetensors file "
                       "(with config.json beside it), a .gguf file, 'smollm2' or 'tiny'")


def resolve_model_path(path: str) -> tuple[Path, str | None]:
    """-> (directory for from_pretrained, gguf file name or None)."""
    if path == "smollm2":
        return smollm2_hf_dir(), None
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise _missing_path(path)
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise ConfigError(f"model.path {path!r} has no config.json (and not exactly one .gguf); "
                          "point it at an HF model directory")
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise _missing_path(path)
        if not (p.parent / "config.json").is_file():
            raise ConfigError(f"model.path {path!r}: a bare .safetensors needs config.json beside it")
        return p.parent, None
    raise _missing_path(path)


def load_tokenizer(cfg: ModelConfig):
    if cfg.path == "tiny":
        return ByteTokenizer()
    directory, gguf = resolve_model_path(cfg.path)
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf) if gguf else \
        AutoTokenizer.from_pretrained(str(directory))


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype, model_config=None):
    """transformers' BitsAndBytesConfig for cfg.quantization (None for "none").

    int8: LLM.int8() weights (bitsandbytes casts the matmul inputs to fp16 on CPU).  nf4: 4-bit
    NormalFloat (one fp32 absmax per 64-weight block, as npt_ds.planning assumes), computed in the model
    dtype, the packed 4-bit codes stored in that dtype too (``bnb_4bit_quant_storage``: every base
    parameter then has one floating dtype, which ZeRO-3 can partition).  With ``model_config`` given,
    nf4 leaves linears whose input width is not a multiple of 64 unquantised (bitsandbytes' CPU kernel
    dequantises them wrongly; see npt_ds.model.quant.nf4_unaligned_linears).
    """
    if cfg.quantization == "none":
        return None
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    skip = None
    if model_config is not None:
        unaligned = nf4_unaligned_linears(model_config)
        if unaligned:
            skip = ["lm_head", *unaligned]  # a given list replaces transformers' default skip (lm_head)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)


def quantized_device_map() -> dict:
    """bitsandbytes quantises while it loads, on the device it is given: this rank's GPU (groups.gpu_index), not
    ``cuda:0`` on every rank; on a CPU-only machine nothing (bitsandbytes' CPU path)."""
    if not torch.cuda.is_available():
        return {}
    return {"device_map": {"": gpu_index()}}


def load_base_model(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """The frozen base as a LlamaForCausalLM in cfg.dtype (call under HfDeepSpeedConfig for ZeRO-3).

    A quantised base (cfg.quantization int8 / nf4) is loaded through bitsandbytes, never partitioned;
    see npt_ds.model.quant for the DeepSpeed stages and precisions that work with it.
    """
    dtype = DTYPES[cfg.dtype]
    if cfg.path == "tiny" and cfg.quantization == "none":
        return tiny_llama(cfg.tiny, seed).to(dtype)
    kwargs = dict(dtype=dtype)
    if cfg.path == "tiny":  # quantised tiny model: materialise it in a temp dir, then load via bnb
        with tempfile.TemporaryDirectory(prefix="npt-tiny-") as tmp:
            tiny = tiny_llama(cfg.tiny, seed)  # full tensors, not ZeRO-3 placeholders, go into the checkpoint
            # written by every rank (save_pretrained writes on rank 0 only); tied lm_head stored once
            tiny.config.save_pretrained(tmp)
            save_model(tiny, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            qcfg = quantization_config(cfg, dtype, tiny.config)
            del tiny
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qcfg, **kwargs,
                                                         **quantized_device_map())
        return prepare_quantized_model(model).eval()
    directory, gguf = resolve_model_path(cfg.path)
    if gguf:
        kwargs["gguf_file"] = gguf
    qcfg = None
    if cfg.quantization != "none":
        if gguf:  # transformers refuses a quantization_config together with gguf_file
            raise ConfigError(f"model.quantization: {cfg.quantization} cannot re-quantise the GGUF file {gguf!r}; "
                              "point model.path at an HF directory (or use path: smollm2)")

        hf_config = AutoConfig.from_pretrained(str(directory))
        qcfg = quantization_config(cfg, dtype, hf_config)
        kwargs["quantization_config"] = qcfg
        kwargs.update(quantized_device_map())
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if getattr(model.config, "model_type", None) != "llama":
        raise ConfigError(f"model.path {cfg.path!r} is a {model.config.model_type!r} model; NPT needs a Llama")
    if qcfg is not None:
        prepare_quantized_model(model)
    return model.eval()
