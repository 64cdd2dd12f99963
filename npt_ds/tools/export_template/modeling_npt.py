"""NPT (Neuro-Plastic Transformer) Llama for transformers' ``trust_remote_code``; needs only torch + transformers.

Written by ``npt-ds export``.  The listed NPT layers drop the attention residual and let the attention
output a drive a per-token rank-k update of the MLP gate:

    r = a W_down,  v_a,k = r W_a_up,k,  v_b,k = r W_b_up,k,  x = post_attention_layernorm(h)
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
                 npt_dual=False, npt_multiplicative=False, **kwargs):
        self.npt_layers = list(npt_layers)
        self.npt_rank = npt_rank
        self.npt_num_ranks = npt_num_ranks
        self.npt_modulation_scale = npt_modulation_scale
        self.npt_dual = npt_dual
        self.npt_multiplicative = npt_multiplicative
        super().__init__(**kwargs)


class NPComponent(nn.Module):
    """Attention output -> modulation vectors v_a (d_model), v_b (d_ffn) per rank, optional v_c and factor."""

    def __init__(self, config: NPTLlamaConfig):
        super().__init__()
        d, f, rank, k = config.hidden_size, config.intermediate_size, config.npt_rank, config.npt_num_ranks
        self.W_down = nn.Parameter(torch.zeros(d, rank))
        self.W_a_up = nn.Parameter(torch.zeros(rank, k, d))
        self.W_b_up = nn.Parameter(torch.zeros(rank, k, f))
        self.W_c_up = nn.Parameter(torch.zeros(rank, k, f)) if config.npt_dual else None
        self.W_m = nn.Parameter(torch.zeros(rank, f)) if config.npt_multiplicative else None

    def forward(self, attn: torch.Tensor):
        r = attn.to(self.W_down.dtype) @ self.W_down
        v_a = torch.einsum("...r,rkd->...kd", r, self.W_a_up)
        v_b = torch.einsum("...r,rkf->...kf", r, self.W_b_up)
        v_c = None if self.W_c_up is None else torch.einsum("...r,rkf->...kf", r, self.W_c_up)
        factor = None if self.W_m is None else 0.5 + torch.sigmoid(r @ self.W_m)
        return v_a, v_b, v_c, factor


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
        v_a, v_b, v_c, factor = self.np(attn)
        coef = torch.einsum("...kd,...d->...k", v_a, x.to(v_a.dtype))
        s = self.modulation_scale
        gate = self.mlp.gate_proj(x)
        if factor is not None:
            gate = gate * factor.to(gate.dtype)
        gate = gate + (s * torch.einsum("...k,...kf->...f", coef, v_b)).to(gate.dtype)
        up = self.mlp.up_proj(x)
        if v_c is not None:
            up = up + (s * torch.einsum("...k,...kf->...f", coef, v_c)).to(up.dtype)
        return hidden_states + self.mlp.down_proj(self.mlp.act_fn(gate) * up)


class NPTLlamaForCausalLM(LlamaForCausalLM):
    config_class = NPTLlamaConfig

    def __init__(self, config: NPTLlamaConfig):
        super().__init__(config)
        for i in config.npt_layers:
            self.model.layers[i] = NPTDecoderLayer(config, i)
        self.post_init()
