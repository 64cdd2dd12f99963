"""The module DeepSpeed wraps: one forward = fused teacher/student pass + every loss term.

Keeping teacher targets, student outputs, optional cross-width teacher and the loss inside a
single `forward` means ZeRO-3 sees the same module order every step (its prefetch trace holds).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .losses import NPTLoss
from .model.fused import fused_forward
from .projector import LogitProjector


@dataclass
class StepControls:
    """What the schedules decide for one step."""

    stage: str = "teacher"  # curriculum stage name (for logging)
    mixing_ratio: float = 0.0
    kd_weight: float = 0.0
    difficulty_keep: float = 1.0
    student_stream: bool = False
    want_logits: bool = False
    poison: bool = False  # testing aid: make this micro-batch's loss NaN
    active_layers: tuple[int, ...] | None = None  # sequential mode: the layer trained now (None = all)
    diagnostics: bool = True  # per-layer v_a/v_b metrics (log steps); False skips forming the vectors


class NPTTrainModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: NPTLoss, teacher: nn.Module | None = None,
                 logit_projector: LogitProjector | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.teacher = teacher
        self.logit_projector = logit_projector

    def forward(self, input_ids: torch.Tensor, controls: StepControls) -> tuple[torch.Tensor, dict]:
        out = fused_forward(self.model, input_ids, mixing_ratio=controls.mixing_ratio,
                            student_stream=controls.student_stream, want_logits=controls.want_logits,
                            active=controls.active_layers,
                            extras=self.loss_fn.extras(diagnostics=controls.diagnostics))
        if self.teacher is not None:  # KD from a teacher of another width, read out via the student's head
            with torch.no_grad():
                hidden = self.teacher.model(input_ids=input_ids).last_hidden_state
            out.teacher_logits = self.model.lm_head(self.logit_projector(hidden.to(self.logit_projector.weight.dtype)))
        params = [p for p in self.parameters() if p.requires_grad] if self.loss_fn.adaptive else None
        total, comps = self.loss_fn(out, kd_weight=controls.kd_weight, params=params,
                                    difficulty_keep=controls.difficulty_keep)
        if controls.poison:
            total = total * float("nan")
            comps["loss/total"] = total.detach()
        return total, comps
