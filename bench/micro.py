"""Micro-benchmark: the NPT modulated MLP vs a plain LlamaMLP vs a naive per-token ΔW MLP.

All variants run forward + backward with the MLP weights frozen (as in NPT training) and a fixed
random output gradient.  Two gradient settings are measured:

* ``plain``        -- LlamaMLP(x), gradient to its input x (what a frozen layer inside a network does).
* ``npt``          -- NPComponent(attn) -> modulated_mlp(x); gradients to x, attn and the NP params:
                      the plain MLP's job plus the modulation, the like-for-like comparison (target).
* ``npt_frozen_in``-- the same with x and attn constants (single-layer training: the teacher state
                      carries no gradient, so only the NP params need one).
* ``npt_vectors``  -- the formulation before the factored one: v_a, v_b materialised per token, then
                      gate += s Σ_k v_b,k (v_a,k·x) (:func:`vector_modulated_mlp`); shows what factoring saved.
* ``naive``        -- materialises the per-token ΔW_g = s Σ_k v_b,k ⊗ v_a,k (T × d_ffn × d) and applies
                      (W_g + ΔW_g) x per token; small token counts only.  Compared with ``npt`` at the
                      same token count.
"""
from __future__ import annotations

import torch
from torch import nn

from npt_ds.model import Modulation, NPComponent, modulated_mlp

from .common import alloc_peak_mb, count_flops, format_table, interleaved, ratio, resolve_dtype, stats, target

SMOLLM2 = dict(d=576, d_ffn=1536, rank=64, heads=9, kv_heads=3)


def vector_modulated_mlp(mlp: nn.Module, x: torch.Tensor, mod: Modulation, scale: float) -> torch.Tensor:
    """gate = f ⊙ W_g x + s Σ_k v_b,k (v_a,k·x) from materialised per-token vectors (no ΔW)."""
    coef = torch.einsum("...kd,...d->...k", mod.v_a, x.to(mod.v_a.dtype))
    gate = mlp.gate_proj(x)
    if mod.factor is not None:
        gate = gate * mod.factor.to(gate.dtype)
    gate = gate + (scale * torch.einsum("...k,...kf->...f", coef, mod.v_b)).to(gate.dtype)
    up = mlp.up_proj(x)
    if mod.v_c is not None:
        up = up + (scale * torch.einsum("...k,...kf->...f", coef, mod.v_c)).to(up.dtype)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def naive_modulated_mlp(mlp: nn.Module, x: torch.Tensor, mod: Modulation, scale: float) -> torch.Tensor:
    """The slow formulation NPT avoids: W_g,t = W_g + s Σ_k v_b,k ⊗ v_a,k materialised per token."""
    if mod.v_c is not None or mod.factor is not None:
        raise ValueError("naive_modulated_mlp supports the additive gate modulation only")
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    v_a = mod.v_a.reshape(x2.shape[0], -1, d)
    v_b = mod.v_b.reshape(x2.shape[0], v_a.shape[1], -1)
    delta = scale * torch.einsum("nkf,nkd->nfd", v_b, v_a)  # (N, d_ffn, d): one ΔW per token
    w_gate = mlp.gate_proj.weight.unsqueeze(0) + delta
    gate = torch.bmm(w_gate, x2.unsqueeze(-1)).squeeze(-1)
    out = mlp.down_proj(mlp.act_fn(gate) * mlp.up_proj(x2))
    return out.view(*x.shape[:-1], out.shape[-1])


def build_mlp(d: int, d_ffn: int, device, dtype) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    cfg = LlamaConfig(hidden_size=d, intermediate_size=d_ffn, hidden_act="silu", num_attention_heads=1,
                      num_key_value_heads=1)
    torch.manual_seed(0)
    mlp = LlamaMLP(cfg)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):  # realistic scale (HF init std 0.02)
        nn.init.normal_(lin.weight, std=0.02)
    return mlp.to(device=device, dtype=dtype).requires_grad_(False)


class Case:
    """Inputs and a step function for one variant; `step()` is forward + backward."""

    def __init__(self, kind: str, mlp: nn.Module, tokens: int, d: int, device, dtype, k: int = 1,
                 rank: int = 64, scale: float = 0.1, seed: int = 0):
        self.kind, self.mlp, self.scale = kind, mlp, scale
        g = torch.Generator().manual_seed(seed)
        grad_in = kind in ("plain", "npt", "npt_vectors", "naive")
        self.x = torch.randn(1, tokens, d, generator=g).to(device=device, dtype=dtype).requires_grad_(grad_in)
        self.attn = torch.randn(1, tokens, d, generator=g).to(device=device, dtype=dtype).requires_grad_(
            grad_in and kind != "plain")
        self.gy = torch.randn(1, tokens, d, generator=g).to(device=device, dtype=dtype)
        self.comp = None
        if kind != "plain":
            torch.manual_seed(seed + k)
            self.comp = NPComponent(d, mlp.gate_proj.out_features, rank, k).to(device=device, dtype=dtype)
        self.leaves = [t for t in (self.x, self.attn) if t.requires_grad] + \
                      (list(self.comp.parameters()) if self.comp is not None else [])

    def forward(self) -> torch.Tensor:
        if self.kind == "plain":
            return self.mlp(self.x)
        if self.kind in ("npt", "npt_frozen_in"):
            return modulated_mlp(self.mlp, self.x, self.comp, self.attn, self.scale)[0]
        mod = Modulation(*self.comp(self.attn))
        if self.kind == "naive":
            return naive_modulated_mlp(self.mlp, self.x, mod, self.scale)
        return vector_modulated_mlp(self.mlp, self.x, mod, self.scale)

    def step(self) -> None:
        for t in self.leaves:
            t.grad = None
        self.forward().backward(self.gy)


def run_micro(opts) -> dict:
    device, dtype = opts.device, resolve_dtype(opts.dtype)
    dims = SMOLLM2 if opts.shape == "smollm2" else _shape_dims(opts.shape)
    d, f, rank = dims["d"], dims["d_ffn"], opts.rank or dims["rank"]
    ks = opts.ks
    tokens, naive_tokens = opts.micro_tokens, opts.naive_tokens
    mlp = build_mlp(d, f, device, dtype)
    result: dict = {"config": {"d": d, "d_ffn": f, "rank": rank, "ks": ks, "tokens": tokens,
                               "naive_tokens": naive_tokens, "repeats": opts.repeats, "best_of": opts.best_of,
                               "inner": opts.inner, "dtype": opts.dtype,
                               "device": device, "modulation_scale": 0.1}, "rows": [], "ratios": {}}

    # --- group 1: plain vs modulated MLP at the main token count (all interleaved together)
    cases = {"plain": Case("plain", mlp, tokens, d, device, dtype)}
    for k in ks:
        cases[f"npt_k{k}"] = Case("npt", mlp, tokens, d, device, dtype, k=k, rank=rank)
        cases[f"npt_frozen_in_k{k}"] = Case("npt_frozen_in", mlp, tokens, d, device, dtype, k=k, rank=rank)
        cases[f"npt_vectors_k{k}"] = Case("npt_vectors", mlp, tokens, d, device, dtype, k=k, rank=rank)
    times = interleaved({n: c.step for n, c in cases.items()}, opts.repeats, inner=opts.inner,
                        warmup=2, device=device, best_of=opts.best_of)
    for name, case in cases.items():
        result["rows"].append(_row("main", name, case, tokens, times[name], device, opts.memory, opts.peak_tflops))
    for k in ks:
        result["ratios"][f"npt_k{k}/plain"] = ratio(times, f"npt_k{k}", "plain")
        result["ratios"][f"npt_frozen_in_k{k}/plain"] = ratio(times, f"npt_frozen_in_k{k}", "plain")
        result["ratios"][f"npt_k{k}/npt_vectors_k{k}"] = ratio(times, f"npt_k{k}", f"npt_vectors_k{k}")

    # --- group 2: naive per-token ΔW vs fused, small token count
    if naive_tokens:
        ncases = {}
        for k in ks:
            ncases[f"naive_k{k}"] = Case("naive", mlp, naive_tokens, d, device, dtype, k=k, rank=rank)
            ncases[f"npt_k{k}@{naive_tokens}"] = Case("npt", mlp, naive_tokens, d, device, dtype, k=k, rank=rank)
        for k in ks:  # the naive path really computes the same function
            a = ncases[f"naive_k{k}"]
            with torch.no_grad():
                ref = modulated_mlp(mlp, a.x, a.comp, a.attn, 0.1)[0]
                err = (a.forward() - ref).abs().max().item()
            result["ratios"][f"naive_k{k}_max_abs_err_vs_fused"] = err
        ntimes = interleaved({n: c.step for n, c in ncases.items()}, max(3, opts.repeats // 2), inner=1,
                             warmup=1, device=device, best_of=opts.best_of)
        for name, case in ncases.items():
            result["rows"].append(_row("naive", name, case, naive_tokens, ntimes[name], device, opts.memory,
                                       opts.peak_tflops))
        for k in ks:
            result["ratios"][f"naive_k{k}/npt_k{k}@{naive_tokens}"] = ratio(ntimes, f"naive_k{k}",
                                                                          f"npt_k{k}@{naive_tokens}")

    k1 = result["ratios"].get("npt_k1/plain")
    nk1 = result["ratios"].get(f"naive_k1/npt_k1@{naive_tokens}")
    result["targets"] = {
        "modulated_mlp_k1_vs_plain": target(k1["paired_median"] if k1 else None, 1.15, "<=",
                                            "modulated MLP k=1 time / plain MLP time (fwd+bwd, grads to inputs)"),
        "naive_vs_fused_k1": target(nk1["paired_median"] if nk1 else None, 10.0, ">=",
                                    f"naive per-token ΔW time / fused time at {naive_tokens} tokens, k=1"),
    }
    return result


def _row(group: str, name: str, case: Case, tokens: int, samples: list[float], device: str, memory: bool,
         peak_tflops: float | None = None) -> dict:
    s = stats(samples)
    flops = count_flops(case.step)
    row = {"group": group, "variant": name, "tokens": tokens, "ms_median": s["median_s"] * 1e3,
           "ms_min": s["min_s"] * 1e3, "tokens_per_s": tokens / s["median_s"], "gflop": flops / 1e9,
           "gflops_per_s": flops / 1e9 / s["median_s"]}
    if peak_tflops:
        row["mfu"] = flops / s["median_s"] / (peak_tflops * 1e12)
    if memory:
        row["alloc_peak_mb"] = alloc_peak_mb(case.step, device)
    return row


def _shape_dims(shape: str) -> dict:
    from .models import shape_config

    cfg = shape_config(shape)
    return dict(d=cfg.hidden_size, d_ffn=cfg.intermediate_size, rank=64)


def print_micro(res: dict) -> str:
    cols = [("variant", "variant", ""), ("tokens", "tokens", "d"), ("ms/iter (median)", "ms_median", ".2f"),
            ("ms (min)", "ms_min", ".2f"), ("tokens/s", "tokens_per_s", ",.0f"), ("GFLOP/s", "gflops_per_s", ".1f"),
            ("alloc peak MB", "alloc_peak_mb", ".1f")]
    if any("mfu" in r for r in res["rows"]):
        cols.append(("MFU", "mfu", ".3f"))
    c = res["config"]
    title = f"== micro: MLP fwd+bwd, d {c['d']}, d_ffn {c['d_ffn']}, rank {c['rank']}, {c['dtype']} on {c['device']}"
    lines = [format_table(res["rows"], cols, title)]
    lines.append("ratios (time num/den): " + "; ".join(
        f"{k} = {v['paired_median']:.3f} (medians {v['of_medians']:.3f})" if isinstance(v, dict) else f"{k} = {v:.2e}"
        for k, v in res["ratios"].items()))
    return "\n".join(lines)
