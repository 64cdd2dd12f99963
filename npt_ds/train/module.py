"""The module DeepSpeed wraps: one forward = fused teacher/student pass + every loss term.

Keeping teacher targets, student outputs, optional cross-width teacher and the loss inside a
single `forward` means ZeRO-3 sees the same module order every step (its prefetch trace holds).

With ``frozen_outside`` (ZeRO-3 with a resident base) the engine sees only the trainable modules: a skeleton of
empty containers holds each module that owns trainable parameters at its path in the base, so the parameter
names are those of the whole model (``model.model.layers.26.np.W_down``: checkpoints and param groups do not
change), while the frozen base and a cross-width teacher are plain attributes, never registered.  ZeRO-3 then
installs no hooks on, and runs no coordinator for, the thousands of frozen modules a step passes through; the
NP components are still called as modules from inside the base, so their own hooks gather them as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.fused import fused_forward
from ..model.projector import LogitProjector
from .losses import NPTLoss, next_token_ce


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


def trainable_skeleton(model: nn.Module) -> nn.Module:
    """Empty containers along the paths of `model`'s modules that own trainable parameters, holding those modules
    (the same objects): named_parameters() of the skeleton = the trainable ones of `model`, with the same names."""
    root = nn.Module()
    for name, module in model.named_modules():
        if not name or not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, module)
    return root


class NPTTrainModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: NPTLoss, teacher: nn.Module | None = None,
                 logit_projector: LogitProjector | None = None, frozen_outside: bool = False):
        super().__init__()
        self.frozen_outside = frozen_outside
        if frozen_outside:  # registered: the trainable skeleton under "model"; read as self.model: the real base
            self._modules["model"] = trainable_skeleton(model)
            object.__setattr__(self, "model", model)  # an instance attribute wins over nn.Module's lookup
            object.__setattr__(self, "teacher", teacher)
        else:
            self.model = model
            self.teacher = teacher
        self.loss_fn = loss_fn
        self.logit_projector = logit_projector

    def train(self, mode: bool = True) -> "NPTTrainModule":
        super().train(mode)
        if self.frozen_outside:  # not registered, so not reached by nn.Module.train
            self.model.train(mode)
            if self.teacher is not None:
                self.teacher.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, controls: StepControls) -> tuple[torch.Tensor, dict]:
        out = fused_forward(self.model, input_ids, mixing_ratio=controls.mixing_ratio,
                            student_stream=controls.student_stream, want_logits=controls.want_logits,
                            active=controls.active_layers,
                            extras=self.loss_fn.extras(diagnostics=controls.diagnostics))
        projector_ce = None
        if self.teacher is not None:  # KD from a teacher of another width, read out via the student's head
            teacher_logits = self.cross_width_teacher_logits(input_ids)
            # the student's KD term sees a constant teacher: the projector cannot lower KL by moving the
            # teacher towards the student; it learns from its own next-token objective instead
            out.teacher_logits = teacher_logits.detach()
            projector_ce = next_token_ce(teacher_logits, input_ids)
        params = [p for p in self.parameters() if p.requires_grad] if self.loss_fn.adaptive else None
        total, comps = self.loss_fn(out, kd_weight=controls.kd_weight, params=params,
                                    difficulty_keep=controls.difficulty_keep)
        if projector_ce is not None:
            total = total + self.loss_fn.cfg.projector_ce_weight * projector_ce
            comps["loss/projector_ce"] = projector_ce.detach()
            comps["loss/total"] = total.detach()
        if controls.poison:
            total = total * float("nan")
            comps["loss/total"] = total.detach()
        return total, comps

    def cross_width_teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits through projector and the student's head (graph kept to the projector only).

        The projector may be fp32 while the frozen head is bf16 (``model.dtype: bfloat16`` with
        ``precision: fp32``): its output is cast to the head's dtype, the head called as a module (ZeRO-3).
        """
        with torch.no_grad():
            hidden = self.teacher.model(input_ids=input_ids).last_hidden_state
        projected = self.logit_projector(hidden.to(self.logit_projector.weight.dtype))
        head_dtype = next(self.model.lm_head.parameters()).dtype
        return self.model.lm_head(projected.to(head_dtype))
