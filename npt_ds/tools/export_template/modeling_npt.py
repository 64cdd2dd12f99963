"""NPT (Neuro-Plastic Transformer) Llama for transformers' ``trust_remote_code``; needs only torch + transformers.

Written by ``npt-ds export``.  The listed NPT layers drop the attention residual and let the attention
output a drive a per-token rank-k update of the MLP gate:

    r = a W_down (+ b_down),  v_a,k = r W_a_up,k,  v_b,k = r W_b_up,k,  x = post_attention_layernorm(h)
    gate = f ⊙ W_g x + s Σ_k v_b,k (v_a,k · x)      (f = 0.5 + sigmoid(r W_m) when multiplicative, else 1)
    up   = W_u x (+ s Σ_k v_c,k (v_a,k · x) when dual),  h' = h + W_dn(SiLU(gate) ⊙ up)

Every other layer, the KV cache, RoPE and the masks are transformers' own Llama.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class NPTLlamaConfig(LlamaConfig):
    model_type = "npt_llama"

    def __init__(self, npt_layers=(), npt_rank=64, npt_num_ranks=1, npt_modulation_scale=0.1,
                 npt_dual=False, npt_multiplicative=False, npt_down_bias=False, **kwargs):
        self.npt_layers = list(npt_layers)
        self.npt_rank = npt_rank
        self.npt_num_ranks = npt_num_ranks
        self.npt_modulation_scale = npt_modulation_scale
        self.npt_dual = npt_dual
        self.npt_multiplicative = npt_multiplicative
        self.npt_down_bias = npt_down_bias
        super().__init__(**kwargs)


class NPComponent(nn.Module):
    """Attention output -> the modulated gate / up pre-activations, without forming v_a, v_b per token:
    v_a,k · x = Σ_j r_j (W_a_up[j,k] · x) and s Σ_k v_b,k (v_a,k · x) = (s · r ⊗ coef) W_b_up (the same
    factorisation and operation order as npt-ds's training code, so the logits agree to rounding)."""

    def __init__(self, config: NPTLlamaConfig):
        super().__init__()
        d, f, rank, k = config.hidden_size, config.intermediate_size, config.npt_rank, config.npt_num_ranks
        self.d_model, self.d_ffn, self.rank, self.num_ranks = d, f, rank, k
        self.W_down = nn.Parameter(torch.zeros(d, rank))
        self.b_down = nn.Parameter(torch.zeros(rank)) if getattr(config, "npt_down_bias", False) else None
        self.W_a_up = nn.Parameter(torch.zeros(rank, k, d))
        self.W_b_up = nn.Parameter(torch.zeros(rank, k, f))
        self.W_c_up = nn.Parameter(torch.zeros(rank, k, f)) if config.npt_dual else None
        self.W_m = nn.Parameter(torch.zeros(rank, f)) if config.npt_multiplicative else None

    def forward(self, attn: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, scale: float):
        """attn, x: (N, d); gate = W_g x, up = W_u x: (N, d_ffn) -> modulated (gate, up)."""
        dtype, n, rank, k = self.W_down.dtype, attn.shape[0], self.rank, self.num_ranks
        r = attn.to(dtype) @ self.W_down
        if self.b_down is not None:
            r = r + self.b_down
        q = (x.to(dtype) @ self.W_a_up.view(rank * k, self.d_model).T).view(n, rank, k)
        coef = torch.einsum("nr,nrk->nk", r, q) if k > 1 else (r * q.squeeze(-1)).sum(-1, keepdim=True)
        z = (scale * r).unsqueeze(-1) * coef.unsqueeze(1) if k > 1 else (scale * coef) * r
        z = z.reshape(n, rank * k)
        if self.W_m is not None:
            gate = gate * (0.5 + torch.sigmoid(r @ self.W_m)).to(gate.dtype)
        gate = _add_matmul(gate, z, self.W_b_up.view(rank * k, self.d_ffn))
        if self.W_c_up is not None:
            up = _add_matmul(up, z, self.W_c_up.view(rank * k, self.d_ffn))
        return gate, up


def _add_matmul(base: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.addmm(base, z, w) if base.dtype == z.dtype else base + (z @ w).to(base.dtype)


class NPTDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: NPTLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.np = NPComponent(config)
        self.modulation_scale = config.npt_modulation_scale

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        x = self.post_attention_layernorm(hidden_states)
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d)
        gate, up = self.np(attn.reshape(-1, d), x2, self.mlp.gate_proj(x2), self.mlp.up_proj(x2),
                           self.modulation_scale)
        return hidden_states + self.mlp.down_proj(self.mlp.act_fn(gate) * up).view(*lead, -1)


class NPTLlamaForCausalLM(LlamaForCausalLM):
    config_class = NPTLlamaConfig

    def __init__(self, config: NPTLlamaConfig):
        super().__init__(config)
        for i in config.npt_layers:
            self.model.layers[i] = NPTDecoderLayer(config, i)
        self.post_init()
