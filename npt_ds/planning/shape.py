"""A Llama-style model's shape from its config.json (an HF dir, a file, or a preset in ``shapes/``), and
the parameter counts the planner needs; no weights are read."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import TINY_DEFAULTS, ConfigError

SHAPES_DIR = Path(__file__).with_name("shapes")
PRESET_ALIASES = {"smollm2": "smollm2-135m"}  # model.path names that map to a shipped shape
FP32 = 4
NF4_BYTES = 0.5 + FP32 / 64  # 4-bit code + fp32 absmax per 64-element block
INT8_BYTES = 1.0  # + fp32 scale per output row, added per matrix


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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config {str(path)!r} is not readable JSON ({exc})") from None


def load_shape(path: str, tiny_overrides: dict | None = None) -> ModelShape:
    """Shape of ``model.path``: an HF dir with config.json, a config.json (or .safetensors with a
    config.json beside it), ``tiny`` (npt_ds's tiny random Llama + ``model.tiny``), or a preset name
    from ``npt_ds/planning/shapes/`` (also matched by an HF repo id's basename, e.g. meta-llama/Llama-3.1-8B)."""
    if path == "tiny":
        return ModelShape.from_hf_config({**TINY_DEFAULTS, **(tiny_overrides or {})}, "tiny")
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path {path!r} has no config.json; the planner needs the model's "
                              "config.json (no weights)")
        return ModelShape.from_hf_config(read_json(p / "config.json"), p.name)
    if p.is_file():
        cfg_file = p if p.suffix == ".json" else p.parent / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"model.path {path!r}: put the model's config.json beside it, or give a "
                              f"preset: {', '.join(list_presets())}")
        return ModelShape.from_hf_config(read_json(cfg_file), p.stem if p.suffix == ".json" else p.parent.name)
    base = p.name.lower()
    for cand in (path, PRESET_ALIASES.get(path, ""), base, base.removesuffix("-instruct")):
        if cand and (SHAPES_DIR / f"{cand}.json").is_file():
            return ModelShape.from_hf_config(read_json(SHAPES_DIR / f"{cand}.json"), cand)
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
