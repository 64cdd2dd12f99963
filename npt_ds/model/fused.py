"""The fused training forward: teacher targets and student outputs from one walk over the layers.

Layers before the first NPT layer run once (the streams coincide there).  Without a student
stream (single-layer training, or the teacher stage ρ = 0 without fidelity / KD) each NPT layer reads
the teacher state, so the whole step costs one frozen forward plus one extra modulated MLP per NPT
layer; and unless a loss reads the final state, nothing after the last NPT layer runs.
"""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .convert import decoder_layers
from .np_component import NO_EXTRAS, NPExtras
from .npt_layer import NPTDecoderLayer
from .outputs import NPTForwardOutput


def fused_forward(model: nn.Module, input_ids: torch.Tensor, *, mixing_ratio: float = 0.0,
                  student_stream: bool = False, want_logits: bool = False,
                  active: Collection[int] | None = None, extras: NPExtras = NO_EXTRAS) -> NPTForwardOutput:
    """Run teacher and NPT student together on `input_ids` (B, T) of a converted model.

    `student_stream` asks for the student's final hidden state (and logits with `want_logits`), for
    fidelity, KD and evaluation.  Without it nothing after the last active NPT layer runs, and the
    student's own stream runs only as far as a mixing ratio > 0 makes a later NPT layer read it.

    `active` (layer indices, default all NPT layers) selects the layers trained this step and
    returned in `out.layers`.  Other NPT layers before the last active one are *carried*: already
    trained, their NPT output propagates in the student stream (no autograd).  NPT layers after
    the last active one are not trained yet and behave as the teacher in both streams.
    `extras` adds each layer's regulariser and/or v_a, v_b to its output (losses, diagnostics).
    """
    inner = model.model
    layers = decoder_layers(model)
    npt_idx = [i for i, layer in enumerate(layers) if isinstance(layer, NPTDecoderLayer)]
    active = set(npt_idx if active is None else active)
    last_npt = max(active)
    carried = {i for i in npt_idx if i not in active and i < last_npt}
    # the student's own stream is computed only where something reads it: the final outputs, or an
    # active layer that mixes it in (ρ > 0) downstream of the first NPT layer (where both streams agree)
    members = sorted(active | carried)
    run_stream = student_stream or (mixing_ratio > 0 and any(i in active for i in members[1:]))
    if not run_stream:
        carried = set()  # their NPT output would reach nothing: the teacher stream runs them as teachers
    with torch.no_grad():
        embeds = inner.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        # position_ids=None: our windows are never packed, and passing them makes transformers check
        # for packed sequences with a host sync every step
        mask = create_causal_mask(config=inner.config, inputs_embeds=embeds, attention_mask=None,
                                  past_key_values=None, position_ids=None)
        position_embeddings = inner.rotary_emb(embeds, position_ids=position_ids)
    attn_kwargs = dict(attention_mask=mask, position_ids=position_ids,
                       position_embeddings=position_embeddings)
    out = NPTForwardOutput()
    h_t, h_s = embeds, None
    for i, layer in enumerate(layers):
        if i > last_npt and not student_stream:
            break  # nothing downstream of the last NPT layer feeds a loss
        if run_stream and h_s is None and (i in active or i in carried):
            h_s = h_t
        if i in active:
            h_t, h_s, layer_out = layer.fused(h_t, h_s, mixing_ratio, attn_kwargs, extras)
            out.layers.append(layer_out)
            continue
        if i in carried:
            with torch.no_grad():
                h_t, h_s = layer.teacher_step(h_t, attn_kwargs), layer.student_step(h_s, attn_kwargs)
            continue
        step = layer.teacher_step if isinstance(layer, NPTDecoderLayer) else (lambda h, kw, f=layer: f(h, **kw))
        with torch.no_grad():
            new_t = step(h_t, attn_kwargs)
        if h_s is not None:
            h_s = step(h_s, attn_kwargs)
        h_t = new_t
    if student_stream:
        with torch.no_grad():
            out.teacher_hidden = inner.norm(h_t)
        out.student_hidden = inner.norm(h_s)
        if want_logits:
            with torch.no_grad():
                out.teacher_logits = model.lm_head(out.teacher_hidden)
            out.student_logits = model.lm_head(out.student_hidden)
    return out
