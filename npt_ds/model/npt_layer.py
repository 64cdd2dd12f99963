"""NPT decoder layer: a Llama decoder layer whose attention drives the MLP gate instead of the residual.

Teacher mode reproduces HF's LlamaDecoderLayer exactly; student mode is the NPT layer
h' = h + MLP_mod(N2(h)).  `fused()` computes teacher targets and student outputs in one pass
for training (attention on the teacher state is shared when the student reads it too).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .np_component import ModulatedMLPInputs, NPComponent, NO_EXTRAS, NPExtras, modulated_mlp
from .outputs import LayerOutput, layer_output

TEACHER, STUDENT = "teacher", "student"


class NPTDecoderLayer(LlamaDecoderLayer):
    """Subclasses LlamaDecoderLayer so transformers treats it as a decoder layer (hidden-state capture,
    gradient checkpointing); it takes over the wrapped layer's submodules instead of building new ones."""

    def __init__(self, layer: nn.Module, layer_idx: int, np_component: NPComponent,
                 modulation_scale: float = 0.1):
        nn.Module.__init__(self)
        # take over the frozen submodules so their parameter names stay model.layers.i.<name>
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.hidden_size = getattr(layer, "hidden_size", None)
        self.layer_idx = layer_idx
        self.np = np_component
        self.modulation_scale = modulation_scale
        self.mode = STUDENT
        self.zero_np_output = False  # testing/diagnostics: force the NP modulation to zero
        self.checkpoint_student = False  # recompute the student MLP in backward (activation checkpointing)

    def attention(self, h: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        out, _ = self.self_attn(hidden_states=self.input_layernorm(h), **attn_kwargs)
        return out

    def student_mlp(self, h: torch.Tensor, attn: torch.Tensor,
                    extras: NPExtras = NO_EXTRAS) -> tuple[torch.Tensor, ModulatedMLPInputs, torch.Tensor]:
        """-> (MLP_mod(N2(h)) modulated by `attn`, what the NP component made, N2(h)).  The output is fp32 when
        the NP component carries a bf16 base's update in fp32 (np_component: ``fp32_update``)."""
        x = self.post_attention_layernorm(h)
        y, inputs = modulated_mlp(self.mlp, x, self.np, attn, self.modulation_scale, extras)
        if self.zero_np_output:  # diagnostics: the plain MLP (the NP outputs are still computed)
            y = self.mlp(x)
        return y, inputs, x

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
        attn_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache,
                           position_embeddings=position_embeddings, **kwargs)
        if self.mode == TEACHER:
            return self.teacher_step(hidden_states, attn_kwargs)
        return self.student_step(hidden_states, attn_kwargs)

    def teacher_step(self, h: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
        """The original layer, with transformers' LlamaDecoderLayer op order (bit-identical)."""
        hidden_states = h + self.attention(h, **attn_kwargs)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def student_step(self, h: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
        """The NPT layer: h + MLP_mod(N2(h)), modulated by A(N1 h)."""
        y, _, _ = self.student_mlp(h, self.attention(h, **attn_kwargs))
        return (h + y).to(h.dtype)

    def fused(self, h_t: torch.Tensor, h_s: torch.Tensor | None, ratio: float, attn_kwargs: dict,
              extras: NPExtras = NO_EXTRAS) -> tuple[torch.Tensor, torch.Tensor | None, LayerOutput]:
        """One training pass of this layer for both streams.

        The student reads h_in = (1-ratio)·h_T + ratio·h_S; its output always propagates:
        h_S' = h_S + y.  With ratio 0 (or no student stream) the attention on h_T is computed once
        and shared by the teacher target and the student modulation.  Teacher work runs without
        autograd (the base is frozen and the teacher state carries no gradient).  `extras` asks for
        the regulariser, v_a and v_b (guidance losses) and the per-layer vector stats in the LayerOutput;
        with ``extras.state_target`` a layer that read the student stream is targeted at h_T' − h_in.
        """
        with torch.no_grad():
            attn_t = self.attention(h_t, **attn_kwargs)
            h_mid = h_t + attn_t
            mlp_t = self.mlp(self.post_attention_layernorm(h_mid))
        if h_s is None or ratio == 0.0:
            h_in, attn = h_t, attn_t
        else:
            h_in = h_s if ratio == 1.0 else (1.0 - ratio) * h_t + ratio * h_s
            attn = self.attention(h_in, **attn_kwargs)
        if self.checkpoint_student and torch.is_grad_enabled():
            y, np_out, x = checkpoint(self.student_mlp, h_in, attn, extras, use_reentrant=False)
        else:
            y, np_out, x = self.student_mlp(h_in, attn, extras)
        target, new_t = attn_t + mlp_t, h_mid + mlp_t
        if extras.state_target and h_in is not h_t:
            # what the layer must add to the state it read to land on the teacher's next state: it corrects
            # the drift of the layers below (gradient reaches them through h_in); equals `target` at ratio 0
            target = new_t - h_in
        new_s = None if h_s is None else (h_s + y).to(h_s.dtype)
        return new_t, new_s, layer_output(self.layer_idx, y, target, attn, x, h_in, np_out, extras)
