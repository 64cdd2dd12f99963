"""The trainable NP component: attention output -> per-token rank-k modulation vectors.

r = a · W_down (d_model -> rank); for each of k ranks v_a,k = r · W_a_up,k (d_model) and
v_b,k = r · W_b_up,k (d_ffn).  Optional extras: v_c,k (d_ffn) to modulate W_up ("dual") and a
bounded multiplicative gate factor 0.5 + sigmoid(r · W_m) in (0.5, 1.5), equal to 1 at init.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Modulation:
    """Per-token modulation produced from one attention output."""

    v_a: torch.Tensor  # (..., k, d_model)
    v_b: torch.Tensor  # (..., k, d_ffn)
    v_c: torch.Tensor | None = None  # (..., k, d_ffn) for the up projection ("dual")
    factor: torch.Tensor | None = None  # (..., d_ffn) multiplicative gate factor in (0.5, 1.5)


class NPComponent(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, rank: int = 64, num_ranks: int = 1, *,
                 dual: bool = False, multiplicative: bool = False, init_b: str = "small",
                 init_std_down: float = 0.02, init_std_a: float = 0.02, init_std_b: float = 0.001):
        super().__init__()
        self.d_model, self.d_ffn, self.rank, self.num_ranks = d_model, d_ffn, rank, num_ranks
        self.W_down = nn.Parameter(torch.empty(d_model, rank))
        # stored (rank, k, n) so the k up-projections are one matmul on a view: no per-step weight copy
        self.W_a_up = nn.Parameter(torch.empty(rank, num_ranks, d_model))
        self.W_b_up = nn.Parameter(torch.empty(rank, num_ranks, d_ffn))
        self.W_c_up = nn.Parameter(torch.empty(rank, num_ranks, d_ffn)) if dual else None
        self.W_m = nn.Parameter(torch.empty(rank, d_ffn)) if multiplicative else None
        self.init_b, self.stds = init_b, (init_std_down, init_std_a, init_std_b)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std_down, std_a, std_b = self.stds
        nn.init.normal_(self.W_down, std=std_down)
        nn.init.normal_(self.W_a_up, std=std_a)
        for w in (self.W_b_up, self.W_c_up):
            if w is not None:
                nn.init.zeros_(w) if self.init_b == "zero" else nn.init.normal_(w, std=std_b)
        if self.W_m is not None:
            nn.init.zeros_(self.W_m)

    def forward(self, attn: torch.Tensor) -> tuple:
        """-> (v_a, v_b, v_c | None, factor | None): a plain tuple so ZeRO-3's hooks see the tensors.

        Wrap it as `Modulation(*np_component(attn))`.
        """
        dtype = self.W_down.dtype
        r = attn.to(dtype) @ self.W_down  # (..., rank)
        lead = r.shape[:-1]

        def up(w: torch.Tensor) -> torch.Tensor:  # (rank, k, n) -> (..., k, n)
            rank, k, n = w.shape
            return (r @ w.view(rank, k * n)).view(*lead, k, n)

        factor = None
        if self.W_m is not None:
            factor = 0.5 + torch.sigmoid(r @ self.W_m)
        return (up(self.W_a_up), up(self.W_b_up), up(self.W_c_up) if self.W_c_up is not None else None, factor)


def modulated_mlp(mlp: nn.Module, x: torch.Tensor, mod: Modulation, scale: float) -> torch.Tensor:
    """W_dn(act(gate) * up) with gate = f ⊙ W_g x + s Σ_k v_b,k (v_a,k·x); never forms a per-token ΔW.

    Costs 2k(d + d_ffn) extra FLOPs per token over the plain MLP (plus the NP projections).
    `mlp` is an HF LlamaMLP; its linear layers are called as modules so ZeRO-3 hooks gather them.
    """
    xc = x.to(mod.v_a.dtype)
    coef = torch.einsum("...kd,...d->...k", mod.v_a, xc)  # (..., k)
    gate = mlp.gate_proj(x)
    if mod.factor is not None:
        gate = gate * mod.factor.to(gate.dtype)
    gate = gate + (scale * torch.einsum("...k,...kf->...f", coef, mod.v_b)).to(gate.dtype)
    up = mlp.up_proj(x)
    if mod.v_c is not None:
        up = up + (scale * torch.einsum("...k,...kf->...f", coef, mod.v_c)).to(up.dtype)
    return mlp.down_proj(mlp.act_fn(gate) * up)
