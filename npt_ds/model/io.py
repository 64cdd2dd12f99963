"""Save/load the NP weights alone (safetensors + conversion spec) and fold modulation into W_gate."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import NPTConfig
from ..parallel.zero import gathered
from .convert import convert_model, np_named_parameters, npt_layers
from .inject import Injections, _refuse_quantised, apply_deltas, inject
from .np_component import Modulation
from .npt_layer import NPTDecoderLayer

WEIGHTS, SPEC = "np_weights.safetensors", "npt_spec.json"
LAYER_WEIGHTS = "np_weights-layer-{:03d}.safetensors"  # a checkpoint's np/: one file per NPT layer
LAYER_WEIGHTS_GLOB = LAYER_WEIGHTS.replace("{:03d}", "*")
LAYER_OF = re.compile(r"\.layers\.(\d+)\.")


def base_signature(model: nn.Module) -> dict:
    c = model.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size}


def save_np_weights(model: nn.Module, out_dir: str | Path, write: bool = True, per_layer: bool = False) -> Path:
    """Write the NP weights and npt_spec.json (conversion spec + base shape) to out_dir: np_weights.safetensors, or
    with `per_layer` one np_weights-layer-XXX.safetensors per NPT layer, gathered and written one layer at a time
    (a checkpoint at scale: no rank ever holds more than one layer's NP weights).

    Under ZeRO-3 every rank must call it (the gathers are collective); `write` says which one writes."""
    out = Path(out_dir)
    spec = {"npt_config": dataclasses.asdict(model.npt_config), "layers": model.npt_layer_indices,
            "base": base_signature(model)}
    files: dict[str, list] = {}
    for name, p in np_named_parameters(model):
        files.setdefault(LAYER_WEIGHTS.format(int(LAYER_OF.search(name)[1])) if per_layer else WEIGHTS, []).append((name, p))
    if write:
        out.mkdir(parents=True, exist_ok=True)
    for file, named in files.items():
        with gathered([p for _, p in named]):
            state = {name: p.detach().to("cpu").clone().contiguous() for name, p in named} if write else None
        if write:
            save_file(state, str(out / file), metadata={"npt_spec": json.dumps(spec)})
        del state
    if not write:
        return out
    (out / SPEC).write_text(json.dumps(spec, indent=2))
    injections = getattr(model, "npt_injections", None) or Injections()
    injections.save(out)  # the folded contexts travel with the NP weights (none: stale files removed)
    return out


def load_np_weights(model: nn.Module, src: str | Path, injections: bool = True) -> list[int]:
    """Load NP weights onto a base model (converting it per the saved spec if needed), and the injection
    deltas saved beside them (added to W_gate / W_up; ``injections=False`` leaves them out)."""
    src = Path(src)
    path = src / WEIGHTS if src.is_dir() else src
    layer_files = sorted(src.glob(LAYER_WEIGHTS_GLOB)) if src.is_dir() and not path.is_file() else []
    if layer_files:  # a checkpoint's per-layer layout
        path = layer_files[0]
    if not path.is_file():
        raise FileNotFoundError(f"no NP weights at {path}; expected a directory written by `npt-ds convert`/training")
    spec = json.loads((path.parent / SPEC).read_text()) if (path.parent / SPEC).is_file() else None
    if spec is None:
        with safe_open(str(path), "pt") as f:
            spec = json.loads(f.metadata()["npt_spec"])
    if spec["base"] != base_signature(model):
        raise ValueError(f"NP weights at {path} were trained on a base with {spec['base']}, "
                         f"but this model has {base_signature(model)}; load the matching base model")
    if not npt_layers(model):
        convert_model(model, NPTConfig(**spec["npt_config"]))
    state = {k: v for f in (layer_files or [path]) for k, v in load_file(str(f)).items()}
    own = dict(np_named_parameters(model))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"NP weights at {path} do not match the conversion: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    with gathered(own.values()), torch.no_grad():
        for name, p in own.items():
            p.copy_(state[name].to(p.dtype))
    saved = Injections.load(path.parent) if injections else Injections()
    if saved.records:
        params = dict(model.named_parameters())
        with gathered([params[n] for n in saved.deltas if n in params]):
            apply_deltas(model, saved.deltas)
    model.npt_injections = saved
    return spec["layers"]


@torch.no_grad()
def fold_modulation(layer: NPTDecoderLayer, mod: Modulation) -> None:
    """Commit one token's modulation into the weights: W_g <- diag(f)·W_g + s Σ_k v_b,k ⊗ v_a,k.

    `mod` holds one token's vectors (v_a: (k, d), v_b: (k, d_ffn), optional v_c, factor).
    Afterwards the plain MLP's gate equals that token's modulated gate for any input x.  A low-level
    helper: the change is not recorded in the model's injections (use :func:`fold_context` /
    :func:`npt_ds.model.inject.inject`, whose deltas are saved with the NP weights).
    """
    s = layer.modulation_scale
    gate, up = layer.mlp.gate_proj, layer.mlp.up_proj
    _refuse_quantised(layer)
    with gathered([p for p in (gate.weight, gate.bias, up.weight, up.bias) if p is not None]):
        w = gate.weight
        delta = s * torch.einsum("kf,kd->fd", mod.v_b.float(), mod.v_a.float())
        new = w.float()
        if mod.factor is not None:
            new = mod.factor.float().unsqueeze(1) * new
            if gate.bias is not None:
                gate.bias.mul_(mod.factor.to(gate.bias.dtype))
        w.copy_((new + delta).to(w.dtype))
        if mod.v_c is not None:
            up.weight.add_((s * torch.einsum("kf,kd->fd", mod.v_c.float(), mod.v_a.float())).to(up.weight.dtype))


def fold_context(model: nn.Module, input_ids: torch.Tensor, positions: list[int] | str | None = None,
                 layers: list[int] | None = None, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Run the NPT model on a context and fold the modulation of the chosen token(s) into W_gate.

    Several positions fold the mean of their per-token updates; the fold is recorded in the model's
    injections, so :func:`save_np_weights` keeps it.  -> the weight deltas (parameter name -> tensor).
    """
    positions = positions if positions is not None else "last"
    record = {"context_ids": input_ids.reshape(-1).tolist(), "layers": layers, "positions": positions,
              "alpha": alpha}
    return inject(model, input_ids, record, layers=layers, positions=positions, alpha=alpha)
