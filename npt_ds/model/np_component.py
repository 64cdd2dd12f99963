"""The trainable NP component: attention output -> per-token rank-k modulation of the MLP gate.

r = a · W_down (+ b_down with ``down_bias``; d_model -> rank); for each of k ranks v_a,k = r · W_a_up,k (d_model) and
v_b,k = r · W_b_up,k (d_ffn).  Optional extras: v_c,k (d_ffn) to modulate W_up ("dual") and a
bounded multiplicative gate factor 0.5 + sigmoid(r · W_m) in (0.5, 1.5), equal to 1 at init (W_m = 0).
(DESIGN §1 writes 0.5 + 0.5·sigmoid(z), whose range is (0.5, 1.0) and whose init value is 0.75; the
range it states, and identity at init, are what this form gives.)

Training never materialises v_a or v_b.  Because both are linear in r, per token
    v_a,k · x = Σ_j r_j (W_a_up[j,k] · x)            (q = x W_a_upᵀ: one (rank·k)-wide matmul)
    s Σ_k v_b,k (v_a,k · x) = (s · r ⊗ coef) W_b_up  (one matmul, accumulated into W_g x by addmm)
    mean v_a² = Σ (rᵀr) ⊙ (W_a_up W_a_upᵀ) / (T k d)  (rank × rank Gram matrices)
so the only per-token tensors are (tokens, rank·k) wide.  The regulariser and the vectors themselves
are computed on request (:class:`NPExtras`: the loss, logged diagnostics, guidance losses; folding).
All weight use happens inside `forward`, where ZeRO-3 has the parameters gathered.

Precision (``fp32_update``, on by default): at init the update is ~1e-3 of W_g x, below half a bf16 step, so
added into a bf16 gate most of it rounds away (docs/numerics.md has the measurement).  With a bf16/fp16 base
the modulated pre-activations are then formed in fp32, and the layer's output is the plain MLP plus
W_dn(δ) with δ = SiLU(gate)⊙up − SiLU(W_g x)⊙W_u x in fp32: an update of any size reaches the output (in
fp32), and a zero update gives the plain MLP's output bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Modulation:
    """Per-token modulation vectors produced from one attention output."""

    v_a: torch.Tensor  # (..., k, d_model)
    v_b: torch.Tensor  # (..., k, d_ffn)
    v_c: torch.Tensor | None = None  # (..., k, d_ffn) for the up projection ("dual")
    factor: torch.Tensor | None = None  # (..., d_ffn) multiplicative gate factor in (0.5, 1.5)


@dataclass(frozen=True)
class NPExtras:
    """What a training forward wants from the NP component beyond the modulated MLP."""

    vectors: bool = False  # keep v_a, v_b (v_c, factor) with autograd: the guidance losses read them
    reg: bool = False  # mean(v_a²) + mean(v_b²): the regulariser (loss.reg_lambda > 0)
    diagnostics: bool = False  # form the vectors without autograd, for per-layer stats (log steps)
    state_target: bool = False  # the layer's target is the teacher's next state minus what the layer read


NO_EXTRAS = NPExtras()


@dataclass
class ModulatedMLPInputs:
    """What the NP component makes of one layer's base MLP pre-activations (see `NPComponent.forward`)."""

    gate: torch.Tensor  # f ⊙ W_g x + s Σ_k v_b,k (v_a,k · x)
    up: torch.Tensor  # W_u x (+ s Σ_k v_c,k (v_a,k · x) when dual)
    coef: torch.Tensor  # (..., k) v_a,k · x, unscaled
    reg: torch.Tensor | None = None  # 0-dim mean(v_a²) + mean(v_b²), when requested (exact, via Gram matrices)
    mod: Modulation | None = None  # the vectors, when requested (NPExtras.vectors / diagnostics)


class NPComponent(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, rank: int = 64, num_ranks: int = 1, *,
                 dual: bool = False, multiplicative: bool = False, down_bias: bool = False, init_b: str = "small",
                 init_std_down: float = 0.02, init_std_a: float = 0.02, init_std_b: float = 0.001,
                 fp32_update: bool = True):
        super().__init__()
        self.d_model, self.d_ffn, self.rank, self.num_ranks = d_model, d_ffn, rank, num_ranks
        self.fp32_update = fp32_update  # a bf16/fp16 base's gate and up are modulated in fp32 (module docstring)
        self.W_down = nn.Parameter(torch.empty(d_model, rank))
        self.b_down = nn.Parameter(torch.empty(rank)) if down_bias else None
        # stored (rank, k, n): the k up-projections are one matmul on a view, no per-step weight copy
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
        if self.b_down is not None:
            nn.init.zeros_(self.b_down)
        nn.init.normal_(self.W_a_up, std=std_a)
        for w in (self.W_b_up, self.W_c_up):
            if w is not None:
                nn.init.zeros_(w) if self.init_b == "zero" else nn.init.normal_(w, std=std_b)
        if self.W_m is not None:
            nn.init.zeros_(self.W_m)

    def forward(self, attn: torch.Tensor, x: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                up: torch.Tensor | None = None, scale: float = 1.0, extras: NPExtras = NO_EXTRAS) -> tuple:
        """Two uses, one entry point (so ZeRO-3 gathers the weights for either):

        * ``np(attn)`` -> ``(v_a, v_b, v_c | None, factor | None)``; wrap as ``Modulation(*np(attn))``.
        * ``np(attn, x, gate, up, scale, extras)`` with the base pre-activations gate = W_g x and
          up = W_u x -> ``(gate, up, coef, reg | None, v_a, v_b, v_c, factor)`` (a flat tuple of plain
          tensors, so ZeRO-3's hooks see them; the vectors are None unless ``extras.vectors`` or
          ``extras.diagnostics``, and carry no autograd graph without ``extras.vectors``).  The modulation
          is added into 2-D ``gate`` / ``up`` in place: pass fresh pre-activations, not tensors used elsewhere.
          With ``fp32_update`` and a bf16/fp16 ``gate``, the returned gate and up are new fp32 tensors and
          ``gate`` / ``up`` are left as they were.
        """
        dtype = self.W_down.dtype
        lead = attn.shape[:-1]
        r = attn.reshape(-1, self.d_model).to(dtype) @ self.W_down  # (N, rank)
        if self.b_down is not None:
            r = r + self.b_down
        factor = None if self.W_m is None else 0.5 + torch.sigmoid(r @ self.W_m)
        if x is None:
            return self._vectors(r, factor, lead)
        n, rank, k = r.shape[0], self.rank, self.num_ranks
        q = (x.reshape(n, self.d_model).to(dtype) @ self.W_a_up.view(rank * k, self.d_model).T).view(n, rank, k)
        coef = torch.einsum("nr,nrk->nk", r, q) if k > 1 else (r * q.squeeze(-1)).sum(-1, keepdim=True)
        z = (scale * r).unsqueeze(-1) * coef.unsqueeze(1) if k > 1 else (scale * coef) * r  # (N, rank[, k])
        z = z.reshape(n, rank * k)
        gate2, up2 = _flat(gate, n), _flat(up, n)
        if self.fp32_update and gate2.dtype.itemsize < 4:
            gate2, up2 = gate2.float(), up2.float()
        if factor is not None:
            gate2 = gate2 * factor.to(gate2.dtype)
        gate2 = _add_matmul(gate2, z, self.W_b_up.view(rank * k, self.d_ffn))
        if self.W_c_up is not None:
            up2 = _add_matmul(up2, z, self.W_c_up.view(rank * k, self.d_ffn))
        reg = self._regulariser(r) if extras.reg else None
        vecs = (None, None, None, None)
        if extras.vectors or extras.diagnostics:
            with torch.set_grad_enabled(torch.is_grad_enabled() and extras.vectors):
                vecs = self._vectors(r, factor, lead)
        return (gate2.view(*lead, self.d_ffn), up2.view(*lead, self.d_ffn), coef.view(*lead, k), reg) + vecs

    def _regulariser(self, r: torch.Tensor) -> torch.Tensor:
        """mean(v_a²) + mean(v_b²) without the vectors: Σ_t |r_t W|² = Σ (rᵀr) ⊙ (W Wᵀ)."""
        dtype = torch.promote_types(r.dtype, torch.float32)  # at least fp32 (bf16 params); double stays double
        rf = r.to(dtype)
        gram_r = rf.T @ rf  # (rank, rank)
        total = 0.0
        for w in (self.W_a_up, self.W_b_up):
            rank, k, n = w.shape
            w2 = w.view(rank, k * n).to(dtype)
            total = total + (gram_r * (w2 @ w2.T)).sum() / (r.shape[0] * k * n)
        return total

    def _vectors(self, r: torch.Tensor, factor: torch.Tensor | None, lead: torch.Size) -> tuple:
        def up_proj(w: torch.Tensor) -> torch.Tensor:  # (rank, k, n) -> (..., k, n)
            rank, k, n = w.shape
            return (r @ w.view(rank, k * n)).view(*lead, k, n)

        return (up_proj(self.W_a_up), up_proj(self.W_b_up),
                None if self.W_c_up is None else up_proj(self.W_c_up),
                None if factor is None else factor.view(*lead, self.d_ffn))


def _flat(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as (n, features): itself when already 2-D (an in-place add into a view would cost autograd a rebase)."""
    return t if t.dim() == 2 else t.reshape(n, t.shape[-1])


def _add_matmul(base: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """base += z @ w in place (base is a fresh pre-activation no autograd node saved), one addmm when the
    dtypes agree (base is in the frozen model's dtype); an out-of-place addmm would first copy base."""
    if base.dtype == z.dtype:
        return base.addmm_(z, w)
    return base.add_((z @ w).to(base.dtype))


def modulated_mlp(mlp: nn.Module, x: torch.Tensor, np_component: NPComponent, attn: torch.Tensor, scale: float,
                  extras: NPExtras = NO_EXTRAS) -> tuple[torch.Tensor, ModulatedMLPInputs]:
    """W_dn(act(gate) ⊙ up) with gate = f ⊙ W_g x + s Σ_k v_b,k (v_a,k·x), modulated by `attn`.

    Never forms a per-token ΔW (nor v_a, v_b unless `extras.vectors`).  `mlp` is an HF LlamaMLP; its linear
    layers are called as modules so ZeRO-3 hooks gather them.  -> (output, what the NP component made).
    When the NP component returns fp32 pre-activations for a bf16/fp16 base (``fp32_update``), the output is
    fp32: W_dn(SiLU(W_g x) ⊙ W_u x) + W_dn(δ), δ the modulation's change of the hidden computed in fp32
    (exactly 0 for a zero update, so the output then equals the plain MLP's bit for bit).
    """
    x2 = x.reshape(-1, x.shape[-1])  # 2-D pre-activations: the NP component adds into them in place
    base_gate, base_up = mlp.gate_proj(x2), mlp.up_proj(x2)
    gate, up, coef, reg, *vecs = np_component(attn, x2, base_gate, base_up, scale, extras)
    lead = x.shape[:-1]
    coef = coef.view(*lead, coef.shape[-1])
    inputs = ModulatedMLPInputs(gate.view(*lead, -1), up.view(*lead, -1), coef, reg,
                                None if vecs[0] is None else Modulation(*vecs))
    if gate.dtype == base_gate.dtype:  # the update went into the base pre-activations in place
        return mlp.down_proj(mlp.act_fn(gate) * up).view(*lead, -1), inputs
    delta = mlp.act_fn(gate.view_as(base_gate)) * up.view_as(base_up) - mlp.act_fn(base_gate.float()) * base_up.float()
    out = mlp.down_proj(mlp.act_fn(base_gate) * base_up).float() + mlp.down_proj(delta.to(base_gate.dtype)).float()
    return out.view(*lead, -1), inputs
