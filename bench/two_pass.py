"""The two-pass reference: teacher and student run as separate passes (lives only in bench/).

1. Teacher pass: the whole model in teacher mode (= the unconverted model) under no_grad, with
   forward hooks on every NPT layer capturing its input h_i and output h_i'; target_i = h_i' − h_i.
2. Student pass: for each NPT layer, recompute the attention on the captured input and run the
   modulated MLP on it: exactly the inputs the fused step's single-layer mode uses, so the same
   NPTLoss gives the same loss and gradients.

`student_full_pass` is the cruder variant DESIGN §3 describes ("runs the whole model twice"): the
student pass walks every decoder layer up to the last NPT layer, substituting the teacher's
captured input at each NPT layer.
"""
from __future__ import annotations

import torch
from torch import nn

from npt_ds.model import LayerOutput, NPTForwardOutput, decoder_layers, npt_layers, set_mode

ATTN_KEYS = ("attention_mask", "position_ids", "position_embeddings")


def capture_teacher(model: nn.Module, input_ids: torch.Tensor) -> tuple[dict[int, tuple], dict]:
    """Teacher forward of the decoder stack; -> ({layer index: (input, output)}, attention kwargs)."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    attn_kwargs: dict = {}

    def hook(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        captured[module.layer_idx] = (h_in, h_out)
        if not attn_kwargs:
            attn_kwargs.update({k: kwargs.get(k) for k in ATTN_KEYS})

    layers = npt_layers(model)
    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    set_mode(model, "teacher")
    try:
        with torch.no_grad():
            model.model(input_ids=input_ids, use_cache=False)  # decoder stack + final norm, no LM head
    finally:
        set_mode(model, "student")
        for h in handles:
            h.remove()
    return captured, attn_kwargs


def _student_layer(layer, h_in: torch.Tensor, h_out: torch.Tensor, attn_kwargs: dict) -> LayerOutput:
    attn = layer.attention(h_in, **attn_kwargs)  # recomputed: the teacher pass threw it away
    y, mod, x = layer.student_mlp(h_in, attn)
    return LayerOutput(layer.layer_idx, y, h_out - h_in, attn, mod.v_a, mod.v_b, x, h_in)


def two_pass_forward(model: nn.Module, input_ids: torch.Tensor) -> NPTForwardOutput:
    """Teacher pass, then a student pass over the NPT layers only (same outputs as fused single-layer)."""
    captured, attn_kwargs = capture_teacher(model, input_ids)
    out = NPTForwardOutput()
    for layer in npt_layers(model):
        h_in, h_out = captured[layer.layer_idx]
        out.layers.append(_student_layer(layer, h_in, h_out, attn_kwargs))
    return out


def student_full_pass(model: nn.Module, input_ids: torch.Tensor) -> NPTForwardOutput:
    """Teacher pass, then a student pass through every layer up to the last NPT layer."""
    captured, attn_kwargs = capture_teacher(model, input_ids)
    inner = model.model
    layers = decoder_layers(model)
    last = max(captured)
    h = inner.embed_tokens(input_ids)
    out = NPTForwardOutput()
    for i, layer in enumerate(layers):
        if i > last:
            break
        if i in captured:
            h_in, h_out = captured[i]
            layer_out = _student_layer(layer, h_in, h_out, attn_kwargs)
            out.layers.append(layer_out)
            h = h_in + layer_out.student_out
        else:
            h = layer(h, **attn_kwargs)
    return out
