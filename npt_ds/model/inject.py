"""Knowledge injection: commit a context's modulation into W_gate (and W_up when dual), kept as saved deltas.

A context's modulation is read from the full NPT model as inference runs it (the HF forward: real RoPE,
causal mask, every NPT layer in student mode, earlier injections applied), one pass for all chosen layers.
For the chosen token weights w_t (:func:`position_weights`) a layer's update is

    ΔW_g = α · s · Σ_t w_t Σ_k v_b,k(t) ⊗ v_a,k(t)        (s = modulation_scale)
    ΔW_u = α · s · Σ_t w_t Σ_k v_c,k(t) ⊗ v_a,k(t)        (dual only)

(the mean of per-token outer products, never the outer product of mean vectors).  A multiplicative factor
f folds as W_g <- (1 + α(f - 1)) ⊙ W_g from a single token.  With a baseline context the update is
α·(U(context) - U(baseline)) (differential injection).  The sum of all updates lives in
:class:`Injections` (``model.npt_injections``): saved beside the NP weights and re-applied on load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..parallel.zero import gathered
from .convert import decoder_layers, npt_layers, set_mode
from .np_component import Modulation
from .npt_layer import NPTDecoderLayer

DELTAS, RECORDS = "injections.safetensors", "injections.json"
POSITIONS_HELP = "'last', 'all' (sum over tokens), 'mean' (mean over tokens) or 'i:j' (mean over tokens i..j-1)"


def position_weights(spec: str | list[int], n_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Token weights w_t (float64, length n_tokens) for a positions spec (or a list of token indices, weighted
    equally); one-line errors name --positions."""
    if n_tokens < 1:
        raise ValueError("--context: the context is empty (0 tokens); give some text to inject")
    w = torch.zeros(n_tokens, dtype=torch.float64, device=device)
    if isinstance(spec, (list, tuple)):
        bad = [i for i in spec if not -n_tokens <= i < n_tokens]
        if not spec or bad:
            raise ValueError(f"--positions {spec}: out of range for a context of {n_tokens} tokens")
        for i in spec:
            w[i] += 1.0 / len(spec)
        return w
    text = str(spec).strip().lower()
    if text == "last":
        w[-1] = 1.0
    elif text == "all":
        w[:] = 1.0
    elif text == "mean":
        w[:] = 1.0 / n_tokens
    elif ":" in text:
        try:
            lo, hi = (int(v) for v in text.split(":", 1))
        except ValueError:
            raise ValueError(f"--positions: cannot parse {spec!r}; use {POSITIONS_HELP}") from None
        if not 0 <= lo < hi <= n_tokens:
            raise ValueError(f"--positions {spec}: out of range for a context of {n_tokens} tokens; "
                             f"use i:j with 0 <= i < j <= {n_tokens}")
        w[lo:hi] = 1.0 / (hi - lo)
    else:
        raise ValueError(f"--positions: unknown {spec!r}; use {POSITIONS_HELP}")
    return w


@dataclass
class Injections:
    """Summed weight deltas (parameter name -> tensor added to it) and what was injected, in order."""

    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def add(self, deltas: dict[str, torch.Tensor], record: dict) -> None:
        for name, d in deltas.items():
            self.deltas[name] = self.deltas[name] + d if name in self.deltas else d.clone()
        self.records.append(record)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        if not self.records:
            for name in (DELTAS, RECORDS):
                (out / name).unlink(missing_ok=True)
            return
        save_file({k: v.contiguous() for k, v in self.deltas.items()}, str(out / DELTAS))
        (out / RECORDS).write_text(json.dumps(self.records, indent=2))

    @classmethod
    def load(cls, src_dir: str | Path) -> "Injections":
        src = Path(src_dir)
        if not (src / RECORDS).is_file():
            return cls()
        if not (src / DELTAS).is_file():
            raise FileNotFoundError(f"{src / RECORDS} lists injections but {DELTAS} is missing; "
                                    "re-run npt-ds inject or pass --reset")
        return cls(load_file(str(src / DELTAS)), json.loads((src / RECORDS).read_text()))


def injections_of(model: nn.Module) -> Injections:
    if getattr(model, "npt_injections", None) is None:
        model.npt_injections = Injections()
    return model.npt_injections


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add each delta to the named parameter (in the parameter's dtype)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(deltas) - set(params))
    if unknown:
        raise ValueError(f"injection deltas name {unknown[0]!r}, which this model does not have; "
                         "load the base the injections were made on")
    for name, d in deltas.items():
        params[name].add_(d.to(params[name].device, params[name].dtype))


def chosen_layers(model: nn.Module, layers: list[int] | None) -> list[NPTDecoderLayer]:
    """The NPT layers to inject into (default: all); a layer that is not NPT is a one-line error."""
    by_index = {layer.layer_idx: layer for layer in npt_layers(model)}
    if layers is None:
        return list(by_index.values())
    n = len(decoder_layers(model))
    for i in layers:
        if i not in by_index:
            raise ValueError(f"--layers: layer {i} is not an NPT layer (the model has {n} layers; "
                             f"its NPT layers are {sorted(by_index)}); choose among those")
    return [by_index[i] for i in layers]


@torch.no_grad()
def context_attention(model: nn.Module, input_ids: torch.Tensor, layers: list[NPTDecoderLayer]) -> dict[int, torch.Tensor]:
    """Attention outputs (T, d) driving each chosen NPT layer on one context, from the full model's forward."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, args, out, idx=layer.layer_idx: captured.__setitem__(idx, out[0][0].detach()))
        for layer in layers]
    modes = [layer.mode for layer in npt_layers(model)]
    try:
        set_mode(model, "student")
        model(input_ids=input_ids[:1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for layer, mode in zip(npt_layers(model), modes):
            layer.mode = mode
    return captured


def _update(layer: NPTDecoderLayer, mod: Modulation, w: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """α · s · Σ_t w_t Σ_k v ⊗ v_a for W_gate (and W_up), plus the folded factor, in at least fp32."""
    dtype = torch.promote_types(layer.mlp.gate_proj.weight.dtype, torch.float32)
    prefix = f"model.layers.{layer.layer_idx}.mlp."
    scale = alpha * layer.modulation_scale
    wt = w.to(dtype)
    v_a = mod.v_a.to(dtype)
    out = {prefix + "gate_proj.weight": scale * torch.einsum("t,tkf,tkd->fd", wt, mod.v_b.to(dtype), v_a)}
    if mod.v_c is not None:
        out[prefix + "up_proj.weight"] = scale * torch.einsum("t,tkf,tkd->fd", wt, mod.v_c.to(dtype), v_a)
    if mod.factor is not None:
        if int((w != 0).sum()) != 1 or float(w.max()) != 1.0:
            raise ValueError("--positions: a multiplicative NP factor folds from one token only; use --positions last")
        if layer.mlp.gate_proj.bias is not None:
            raise ValueError(f"--layers: layer {layer.layer_idx} has a gate bias and a multiplicative factor; "
                             "injection supports the bias-free Llama MLP only")
        f = mod.factor[int(w.argmax())].to(dtype)
        out[prefix + "gate_proj.weight"] += (alpha * (f - 1.0)).unsqueeze(1) * layer.mlp.gate_proj.weight.to(dtype)
    return out


@torch.no_grad()
def context_deltas(model: nn.Module, input_ids: torch.Tensor, *, layers: list[int] | None = None,
                   positions: str | list[int] = "last", alpha: float = 1.0,
                   baseline_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weight deltas that commit the context's (minus the baseline's) modulation into the chosen layers."""
    chosen = chosen_layers(model, layers)
    for layer in chosen:
        _refuse_quantised(layer)
    runs = [(input_ids, 1.0)] + ([] if baseline_ids is None else [(baseline_ids, -1.0)])
    if baseline_ids is not None and any(layer.np.W_m is not None for layer in chosen):
        raise ValueError("--baseline: differential injection is additive; a multiplicative NP factor cannot be "
                         "subtracted (inject without --baseline)")
    total: dict[str, torch.Tensor] = {}
    for ids, sign in runs:
        w = position_weights(positions, int(ids.shape[-1]), ids.device)
        attn = context_attention(model, ids.reshape(1, -1), chosen)
        for layer in chosen:
            for name, d in _update(layer, Modulation(*layer.np(attn[layer.layer_idx])), w, sign * alpha).items():
                total[name] = total[name] + d if name in total else d
    return total


def inject(model: nn.Module, input_ids: torch.Tensor, record: dict, **kwargs) -> dict[str, torch.Tensor]:
    """context_deltas, applied to the model and added to its Injections (with `record` saying what it was)."""
    deltas = context_deltas(model, input_ids, **kwargs)
    params = dict(model.named_parameters())
    with gathered([params[n] for n in deltas]):
        apply_deltas(model, deltas)
    injections_of(model).add(deltas, record)
    return deltas


def _refuse_quantised(layer: NPTDecoderLayer) -> None:
    for name in ("gate_proj", "up_proj"):
        linear = getattr(layer.mlp, name)
        if type(linear).__module__.split(".")[0] == "bitsandbytes":
            raise ValueError(f"fold: layer {layer.layer_idx} mlp.{name} is bitsandbytes-quantised "
                             f"({type(linear).__name__}); folding would edit its packed codes; load the base "
                             "unquantised (model.quantization: none) to fold")
