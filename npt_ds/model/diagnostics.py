"""Per-layer diagnostics of the modulation vectors (logged as layer/{i}/v_a_norm, v_b_norm, v_a_attn_sim)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attn_alignment(v_a: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The logged ``v_a_attn_sim``: mean over tokens and k of |cos(v_a,k, a)|.

    Sign-invariant on purpose: the modulation s·v_b (v_a·x) is unchanged when v_a and v_b flip sign
    together, so only the magnitude of the alignment with the attention output is meaningful.
    """
    a = attn.float().unsqueeze(-2).expand_as(v_a)
    return F.cosine_similarity(v_a.float(), a, dim=-1, eps=1e-8).abs().mean()


@torch.no_grad()
def vector_stats(v_a: torch.Tensor, v_b: torch.Tensor, attn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean L2 norms of v_a and v_b (over tokens and k) and :func:`attn_alignment`, as 0-dim tensors."""
    return {"v_a_norm": v_a.float().norm(dim=-1).mean(), "v_b_norm": v_b.float().norm(dim=-1).mean(),
            "v_a_attn_sim": attn_alignment(v_a, attn)}
