"""Candidate npt_ds changes, measured here by monkeypatching (npt_ds itself is not edited).

`modulated_mlp_fast` is a drop-in for `npt_ds.model.np_component.modulated_mlp`: it multiplies
`modulation_scale` into the (..., k) coefficients instead of the (..., d_ffn) product, and for k = 1
applies the modulation with one fused multiply-add (`addcmul`) instead of einsum + scale + add
(two fewer full-width elementwise passes forward, one fewer backward).  Same maths.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _add_modulation(base: torch.Tensor, coef: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """base + Σ_k coef_k v_k with coef (..., k) already scaled, v (..., k, n)."""
    if v.shape[-2] == 1:
        return torch.addcmul(base, coef.to(base.dtype), v.squeeze(-2).to(base.dtype))
    return base + torch.einsum("...k,...kf->...f", coef, v).to(base.dtype)


def modulated_mlp_fast(mlp: nn.Module, x: torch.Tensor, mod, scale: float) -> torch.Tensor:
    coef = torch.einsum("...kd,...d->...k", mod.v_a, x.to(mod.v_a.dtype)) * scale  # (..., k)
    gate = mlp.gate_proj(x)
    if mod.factor is not None:
        gate = gate * mod.factor.to(gate.dtype)
    gate = _add_modulation(gate, coef, mod.v_b)
    up = mlp.up_proj(x)
    if mod.v_c is not None:
        up = _add_modulation(up, coef, mod.v_c)
    return mlp.down_proj(mlp.act_fn(gate) * up)


@contextlib.contextmanager
def patched_modulated_mlp(fn=modulated_mlp_fast):
    """Temporarily route npt_ds's modulated MLP (np_component and npt_layer) through `fn`."""
    import npt_ds.model.np_component as npc
    import npt_ds.model.npt_layer as npl

    saved = npc.modulated_mlp, npl.modulated_mlp
    npc.modulated_mlp = npl.modulated_mlp = fn
    try:
        yield
    finally:
        npc.modulated_mlp, npl.modulated_mlp = saved
