"""What one fused NPT forward returns: per-layer tensors the losses and metrics need."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .diagnostics import vector_stats


@dataclass
class LayerOutput:
    """Tensors of one NPT layer for one forward (all (B, T, ...) float tensors).

    student_out: y_i = MLP_mod(N2(h_in))  (what the NPT layer adds to the residual stream)
    target:      a_T + MLP(N2(h_T + a_T)) (what the teacher layer added), None when not computed
    attn:        attention output a that drives the modulation (B, T, d)
    x:           N2(h_in), the MLP input (B, T, d)
    h_in:        the hidden state the layer read (teacher/student mix)
    coef:        (B, T, k) v_a,k · x
    reg:         0-dim mean(v_a²) + mean(v_b²); None unless the forward was asked for it (NPExtras)
    v_a, v_b:    (B, T, k, d), (B, T, k, d_ffn); None unless the forward was asked to keep them
    stats:       0-dim v_a_norm, v_b_norm, v_a_attn_sim (model.diagnostics.vector_stats) when the forward
                 was asked for diagnostics: reduced at once, so no layer's vectors outlive it
    """

    index: int
    student_out: torch.Tensor
    target: torch.Tensor | None
    attn: torch.Tensor
    x: torch.Tensor
    h_in: torch.Tensor
    coef: torch.Tensor
    reg: torch.Tensor | None = None
    v_a: torch.Tensor | None = None
    v_b: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] | None = None


@dataclass
class NPTForwardOutput:
    layers: list[LayerOutput] = field(default_factory=list)
    teacher_hidden: torch.Tensor | None = None  # final-norm hidden state of the teacher stream (B, T, d)
    student_hidden: torch.Tensor | None = None  # final-norm hidden state of the student stream
    teacher_logits: torch.Tensor | None = None  # (B, T, V)
    student_logits: torch.Tensor | None = None


def layer_output(index: int, student_out: torch.Tensor, target: torch.Tensor | None, attn: torch.Tensor,
                 x: torch.Tensor, h_in: torch.Tensor, np_out, extras) -> LayerOutput:
    """A LayerOutput from a layer's tensors, its NP component's ModulatedMLPInputs and the NPExtras asked."""
    mod = np_out.mod
    keep = mod is not None and extras.vectors
    stats = vector_stats(mod.v_a, mod.v_b, attn) if mod is not None and extras.diagnostics else None
    return LayerOutput(index, student_out, target, attn, x, h_in, np_out.coef, np_out.reg,
                       mod.v_a if keep else None, mod.v_b if keep else None, stats)
