"""Teacher→student logit projector for KD across widths.

A teacher of another hidden size is read out through the *student's* output embedding:
``logits_T = proj(h_T) @ E_student^T``.  The projector must start near zero (normal std 0.01, bias 0):
with a std-1 (or otherwise "random") init the teacher distribution is a near one-hot on a random
token and the KD KL sits far above ~8 nats, the signature of a broken/random projector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.01


class LogitProjector(nn.Linear):
    """``nn.Linear(teacher_dim, student_dim)`` with weight ~ N(0, 0.01²) and zero bias."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__(teacher_dim, student_dim, bias=True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.bias)

    def teacher_logits(self, teacher_hidden: torch.Tensor, output_embedding_weight: torch.Tensor) -> torch.Tensor:
        """(B, T, teacher_dim) final hidden state, (V, student_dim) student output embedding -> (B, T, V)."""
        projected = self(teacher_hidden.to(self.weight.dtype))
        return F.linear(projected, output_embedding_weight.to(projected.dtype))
