"""Models and batches for the step benchmark: SmolLM2-135M (real weights + text), the tiny test
Llama, or a random-weight model of a shape in npt_ds/planning/shapes/*.json (e.g. Llama-3.1-8B, GPU only
unless the layer count is reduced)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SHAPES_DIR = Path(__file__).resolve().parent.parent / "npt_ds" / "planning" / "shapes"
DEFAULT_NPT_LAYERS = {"smollm2": "upper_half", "tiny": "2,3", "llama-3.1-8b": "14-17", "llama-3.1-70b": "38-41"}
CPU_MAX_LAYERS_BIG = 4  # a full 8B model does not fit a 2-core CPU run; allow a few of its layers only


def shape_config(shape: str, num_layers: int | None = None):
    from transformers import LlamaConfig

    path = SHAPES_DIR / f"{shape}.json"
    if not path.is_file():
        names = sorted(p.stem for p in SHAPES_DIR.glob("*.json"))
        raise SystemExit(f"--shape {shape!r}: no {path}; available: smollm2, tiny, {', '.join(names)}")
    data = json.loads(path.read_text())
    data.pop("architectures", None)
    data.pop("torch_dtype", None)
    data.pop("model_type", None)
    if num_layers:
        data["num_hidden_layers"] = num_layers
    return LlamaConfig(**data)


def random_model(cfg, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM of `cfg` with random weights initialised on `device` (under ZeRO-3's zero.Init when a
    HfDeepSpeedConfig is alive: then partitioned as it is made), in eval mode."""
    from transformers import LlamaForCausalLM

    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def default_npt_layers(shape: str, num_layers: int) -> str:
    spec = DEFAULT_NPT_LAYERS.get(shape, "upper_half")
    if spec not in ("upper_half", "all"):
        last = max(int(tok.split("-")[-1]) for tok in spec.split(","))
        if last >= num_layers:  # reduced depth (CPU smoke runs): convert the upper half instead
            return "upper_half"
    return spec


def build_model(opts) -> nn.Module:
    """A converted (NPT) LlamaForCausalLM in opts.dtype on opts.device, base frozen."""
    from npt_ds.config import ModelConfig, NPTConfig
    from npt_ds.model import convert_model, load_base_model, tiny_llama

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts.dtype]
    device = torch.device(opts.device)
    if opts.shape == "smollm2":
        model = load_base_model(ModelConfig(path="smollm2", dtype="float32" if opts.dtype == "fp32" else "bfloat16"))
    elif opts.shape == "tiny":
        model = tiny_llama().to(dtype)
    else:
        cfg = shape_config(opts.shape, opts.num_layers)
        if device.type == "cpu" and cfg.num_hidden_layers > CPU_MAX_LAYERS_BIG:
            raise SystemExit(f"--shape {opts.shape} on CPU needs --num-layers <= {CPU_MAX_LAYERS_BIG} "
                             f"(it has {cfg.num_hidden_layers}); run the full shape with --device cuda")
        model = random_model(cfg, dtype, device, opts.seed)
    model = model.to(device=device, dtype=dtype)
    n = model.config.num_hidden_layers
    layers = opts.npt_layers or default_npt_layers(opts.shape, n)
    torch.manual_seed(opts.seed)
    convert_model(model, NPTConfig(layers=layers, rank=opts.rank or 64, num_ranks=opts.num_ranks,
                                   dual=getattr(opts, "dual", False)))
    return model


def make_batch(opts, model: nn.Module) -> torch.Tensor:
    """(batch, seq) token ids: real Shakespeare text for SmolLM2, random ids otherwise."""
    if opts.shape == "smollm2":
        from npt_ds.config import DataConfig, ModelConfig
        from npt_ds.data.sources import PackedBatches
        from npt_ds.model import load_tokenizer

        data = PackedBatches(DataConfig(seq_len=opts.seq, micro_batch_size=opts.batch), load_tokenizer(ModelConfig()))
        for _ in range(3):  # skip the Gutenberg header
            next(data)
        ids = next(data)
    else:
        g = torch.Generator().manual_seed(opts.seed)
        ids = torch.randint(0, model.config.vocab_size, (opts.batch, opts.seq), generator=g)
    return ids.to(opts.device)
