"""Two-pass references: teacher and student run as separate passes (they live only in bench/).

Both start with a teacher pass: the whole model in teacher mode (= the unconverted model) under
no_grad, with forward hooks on every NPT layer capturing its input h_i and output h_i'
(target_i = h_i' − h_i).  Then a student pass:

* `two_pass_forward` -- the reference DESIGN §3 names ("runs the whole model twice"): the student
  walks every decoder layer up to the last NPT layer, substituting the teacher's captured input at
  each NPT layer (single-layer training);
* `two_pass_reuse_forward` -- a stronger variant that skips the frozen layers: per NPT layer it
  recomputes the attention on the captured input and runs the modulated MLP.

Both feed the fused step's single-layer inputs to the same NPTLoss, so loss and gradients agree.
"""
from __future__ import annotations

import torch
from torch import nn

from npt_ds.model import LayerOutput, NPExtras, NPTForwardOutput, layer_output, decoder_layers, npt_layers, set_mode

ATTN_KEYS = ("attention_mask", "position_ids", "position_embeddings")
TRAINING_EXTRAS = NPExtras(reg=True)  # what a non-log training step with the default loss asks for


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


def _student_layer(layer, h_in: torch.Tensor, h_out: torch.Tensor, attn_kwargs: dict,
                   extras: NPExtras) -> LayerOutput:
    attn = layer.attention(h_in, **attn_kwargs)  # recomputed: the teacher pass threw it away
    y, np_out, x = layer.student_mlp(h_in, attn, extras)
    return layer_output(layer.layer_idx, y, h_out - h_in, attn, x, h_in, np_out, extras)


def two_pass_reuse_forward(model: nn.Module, input_ids: torch.Tensor,
                           extras: NPExtras = TRAINING_EXTRAS) -> NPTForwardOutput:
    """Teacher pass, then a student pass over the NPT layers only (same outputs as fused single-layer)."""
    captured, attn_kwargs = capture_teacher(model, input_ids)
    out = NPTForwardOutput()
    for layer in npt_layers(model):
        h_in, h_out = captured[layer.layer_idx]
        out.layers.append(_student_layer(layer, h_in, h_out, attn_kwargs, extras))
    return out


def two_pass_forward(model: nn.Module, input_ids: torch.Tensor, extras: NPExtras = TRAINING_EXTRAS) -> NPTForwardOutput:
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
            layer_out = _student_layer(layer, h_in, h_out, attn_kwargs, extras)
            out.layers.append(layer_out)
            h = h_in + layer_out.student_out
        else:
            h = layer(h, **attn_kwargs)
    return out
