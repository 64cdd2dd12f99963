"""Held-out evaluation: base vs NPT perplexity, final-state fidelity and per-layer fidelity.

Per NPT layer i, two fixed protocols make start and end of a run comparable whatever the curriculum
stage (a training step's ``layer/{i}/direct_mse`` depends on the stage's mixing ratio):

* ``eval/layer/{i}/direct_mse_teacher_in`` -- the layer alone on the teacher's input (ρ = 0): how well
  it imitates its teacher layer;
* ``eval/layer/{i}/direct_mse_student_in`` -- inside the full NPT model (ρ = 1, every NPT layer
  active): what inference sees, upstream NPT error included;
* ``eval/layer/{i}/v_a_attn_sim`` -- :func:`npt_ds.model.diagnostics.attn_alignment` on the teacher input.

With ``per_window=True`` the result also holds ``windows``: this rank's per-window NLL sums of base and NPT
and token counts, in batch order (what :mod:`npt_ds.tools.bootstrap` resamples for a confidence interval).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.fused import fused_forward
from ..model.np_component import NPExtras
from ..parallel.groups import all_reduce_sum
from .losses import direct_mse, next_token_ce


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device | str | None = None,
             per_window: bool = False) -> dict:
    """Perplexity of the teacher (base) and the NPT student (all NPT layers active) on `batches`.

    `batches` may live on the host: each is moved to `device` (default: where the model's embedding
    is).  Sums stay on that device until one host read at the end; they are all-reduced.  Every rank runs the
    same number of forwards: ``batches.steps`` for an :class:`~npt_ds.data.sources.EvalBatches` (a rank with
    fewer windows runs its ``pad`` batch and adds zeros, so that every rank -- also one holding only
    padding -- all-reduces the same keys), else ``len(batches)``.
    """
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    sums: dict[str, torch.Tensor] = {}
    counts = {"tokens": 0, "count": 0, "batches": 0}  # host integers: known without a device read

    rows: dict[str, list[torch.Tensor]] = {"nll_base": [], "nll_npt": []}  # (B,) per batch, when per_window

    padding = False  # a padding batch adds zeros: every rank ends with the same keys, in the same order

    def add(key: str, value: torch.Tensor) -> None:
        value = torch.zeros_like(value, dtype=torch.float64) if padding else value.double()
        sums[key] = sums[key] + value if key in sums else value

    def add_nll(key: str, logits: torch.Tensor, ids: torch.Tensor) -> None:
        per_token = next_token_ce(logits, ids, reduction="none").view(ids.shape[0], -1).double()
        add(key, per_token.sum())
        if per_window and not padding:
            rows[key].append(per_token.sum(dim=1))

    for k in range(getattr(batches, "steps", len(batches))):
        padding = k >= len(batches)
        ids = (batches.pad if padding else batches[k]).to(device, non_blocking=True)
        out = fused_forward(model, ids, mixing_ratio=1.0, student_stream=True, want_logits=True)
        teacher_in = fused_forward(model, ids, mixing_ratio=0.0, extras=NPExtras(diagnostics=True))
        add_nll("nll_base", out.teacher_logits, ids)
        add_nll("nll_npt", out.student_logits, ids)
        add("fid", F.mse_loss(out.student_hidden.float(), out.teacher_hidden.float(), reduction="sum"))
        if not padding:
            counts["tokens"] += ids[:, 1:].numel()
            counts["count"] += out.student_hidden.numel()
            counts["batches"] += 1
        for layer in out.layers:
            add(f"layer/{layer.index}/direct_mse_student_in", direct_mse(layer.student_out, layer.target))
        for layer in teacher_in.layers:
            add(f"layer/{layer.index}/direct_mse_teacher_in", direct_mse(layer.student_out, layer.target))
            add(f"layer/{layer.index}/v_a_attn_sim", layer.stats["v_a_attn_sim"])
    keys = sorted(sums)
    values = torch.stack([sums[k] for k in keys]).tolist() + [float(counts[k]) for k in counts]  # the one host read
    total = dict(zip(keys + list(counts), all_reduce_sum(values)))
    result = {"eval/ppl_base": _ppl(total["nll_base"] / total["tokens"]),
              "eval/ppl_npt": _ppl(total["nll_npt"] / total["tokens"]),
              "eval/fidelity_mse": total["fid"] / total["count"], "eval/tokens": int(total["tokens"])}
    result.update({f"eval/{k}": v / total["batches"] for k, v in total.items() if k.startswith("layer/")})
    if per_window:
        windows = {k: torch.cat(v).tolist() if v else [] for k, v in rows.items()}
        windows["tokens"] = [b.shape[1] - 1 for b in batches for _ in range(b.shape[0])]
        result["windows"] = windows
    return result


def layer_table(first: dict, last: dict) -> list[str]:
    """Per-layer start -> end lines of the held-out layer metrics of two evaluations."""
    layers = sorted({int(k.split("/")[2]) for k in last if k.startswith("eval/layer/")})
    metrics = ("direct_mse_teacher_in", "direct_mse_student_in", "v_a_attn_sim")
    lines = [f"{'layer':>5}  " + "  ".join(f"{m:>26}" for m in metrics)]
    for i in layers:
        cells = []
        for m in metrics:
            key = f"eval/layer/{i}/{m}"
            a, b = first.get(key), last.get(key)
            cells.append(f"{a:>11.4g} -> {b:<11.4g}" if a is not None and b is not None else f"{'-':>26}")
        lines.append(f"{i:>5}  " + "  ".join(f"{c:>26}" for c in cells))
    return lines


SIM_BAR, FIDELITY_BAR = 0.7, 0.1  # the seed documents' success bars: v_a-attention similarity >, fidelity MSE <


def success_bars(result: dict) -> dict:
    """The seed documents' success bars of one evaluation, next to its perplexity ratio.

    ``v_a_attn_sim``: the mean over NPT layers of ``eval/layer/{i}/v_a_attn_sim`` (bar > 0.7);
    ``fidelity_mse``: ``eval/fidelity_mse``, the final hidden state's MSE against the base (bar < 0.1).
    """
    sims = [v for k, v in result.items() if k.startswith("eval/layer/") and k.endswith("/v_a_attn_sim")]
    sim = sum(sims) / len(sims) if sims else float("nan")
    fid = result.get("eval/fidelity_mse", float("nan"))
    return {"ppl_ratio": result["eval/ppl_npt"] / result["eval/ppl_base"], "v_a_attn_sim": sim,
            "v_a_attn_sim_met": sim > SIM_BAR, "fidelity_mse": fid, "fidelity_mse_met": fid < FIDELITY_BAR}


def success_line(result: dict) -> str:
    """One summary line: the perplexity ratio and each bar, met or not."""
    bars = success_bars(result)
    met = {True: "met", False: "not met"}
    return (f"NPT/base perplexity {bars['ppl_ratio']:.4f}; success bars: v_a-attention similarity "
            f"{bars['v_a_attn_sim']:.3f} (> {SIM_BAR}: {met[bars['v_a_attn_sim_met']]}), fidelity MSE "
            f"{bars['fidelity_mse']:.4g} (< {FIDELITY_BAR}: {met[bars['fidelity_mse_met']]})")


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")
