"""Held-out evaluation: base vs NPT perplexity and final-state fidelity from one fused forward."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum
from .model.fused import fused_forward


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """Perplexity of the teacher (base) and the NPT student (all NPT layers active) on `batches`.

    Sums are all-reduced, so every rank must call this with the same number of batches.
    """
    nll_base = nll_npt = fid = 0.0
    tokens = count = 0
    for ids in batches:
        out = fused_forward(model, ids, mixing_ratio=1.0, student_stream=True, want_logits=True)
        labels = ids[:, 1:].reshape(-1)
        nll_base += F.cross_entropy(out.teacher_logits[:, :-1].flatten(0, 1).float(), labels, reduction="sum").item()
        nll_npt += F.cross_entropy(out.student_logits[:, :-1].flatten(0, 1).float(), labels, reduction="sum").item()
        fid += F.mse_loss(out.student_hidden.float(), out.teacher_hidden.float(), reduction="sum").item()
        tokens += labels.numel()
        count += out.student_hidden.numel()
    nll_base, nll_npt, fid, tokens, count = all_reduce_sum([nll_base, nll_npt, fid, float(tokens), float(count)])
    return {"eval/ppl_base": _ppl(nll_base / tokens), "eval/ppl_npt": _ppl(nll_npt / tokens),
            "eval/fidelity_mse": fid / count, "eval/tokens": int(tokens)}


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")
