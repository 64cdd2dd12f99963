"""bf16 numerics of the NP update: how much of it survives a bf16 gate, with `npt.fp32_update` off and on.

    python -m bench.numerics [--shape smollm2|tiny|llama-3.2-1b|...] [--device cuda] [--np NP_DIR] [--seq 128]

The model is held in bf16 (what `precision: auto` trains in on a GPU and on this CPU).  Per NPT layer, on the
teacher's input to that layer (bench/two_pass.capture_teacher), the exact update U = s Σ_k v_b,k (v_a,k · x)
and the exact change of the layer's MLP output are computed in fp64 from the bf16 weights and inputs; then:

* ``update_half_steps``: median |U| in units of half a bf16 step of the gate W_g x (below 1, an addition
  rounds it away); ``update_over_gate``: median |U| / |W_g x|;
* ``gate_unchanged`` / ``gate_rel_err`` / ``gate_cos``: the update added into the bf16 gate (fp32_update off):
  the share of gate elements it leaves unchanged, ‖Δgate − U‖ / ‖U‖ and their cosine;
* ``out_rel_err_bf16`` / ``out_rel_err_fp32`` (and ``out_cos_*``): the same for the change of the MLP output,
  with fp32_update off and on (on: the change is carried in fp32 to the output, bench target ≤ 0.05).

`--np` measures trained NP weights instead of the init (``npt-ds train`` checkpoints' ``np/``).  The fused
step is also timed with fp32_update off and on (interleaved, bench/common.py) when `--step-repeats` > 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from torch import nn

from npt_ds.config import LossConfig
from npt_ds.model import NPComponent, load_np_weights, modulated_mlp, npt_layers
from npt_ds.train.losses import NPTLoss
from npt_ds.train.module import NPTTrainModule, StepControls

from .common import format_table, interleaved, ratio, stats, target
from .models import build_model, make_batch
from .two_pass import capture_teacher

BF16_MANTISSA_BITS = 7  # explicit bits: a step is 2^(exponent - 7)


def half_steps(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|values| in units of half a bf16 step of `reference` (elementwise; fp64)."""
    exponent = torch.floor(torch.log2(reference.abs().clamp_min(1e-30)))
    return values.abs() / torch.pow(2.0, exponent - BF16_MANTISSA_BITS - 1)


def _fp64_copy(module: nn.Module, fresh: nn.Module) -> nn.Module:
    fresh = fresh.to(dtype=torch.float64, device=next(module.parameters()).device)
    fresh.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    return fresh


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.flatten().double(), want.flatten().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300)), \
        float(torch.nn.functional.cosine_similarity(got, want, dim=0))


@torch.no_grad()
def layer_survival(layer, h: torch.Tensor, attn_kwargs: dict) -> dict:
    """The update's survival in one bf16 NPT layer on input `h` (see the module docstring)."""
    attn, x = layer.attention(h, **attn_kwargs), layer.post_attention_layernorm(h)
    mlp, comp, s = layer.mlp, layer.np, layer.modulation_scale
    mlp64 = _fp64_copy(mlp, type(mlp)(mlp.config))
    comp64 = _fp64_copy(comp, NPComponent(comp.d_model, comp.d_ffn, comp.rank, comp.num_ranks,
                                          dual=comp.W_c_up is not None, multiplicative=comp.W_m is not None,
                                          down_bias=comp.b_down is not None))
    x2, a2 = x.reshape(-1, x.shape[-1]), attn.reshape(-1, attn.shape[-1])
    x64, a64 = x2.double(), a2.double()
    v_a, v_b, _, _ = comp64(a64)
    update = s * torch.einsum("nkf,nk->nf", v_b, torch.einsum("nkd,nd->nk", v_a, x64))
    gate0 = mlp.gate_proj(x2)
    want_out = modulated_mlp(mlp64, x64, comp64, a64, s)[0] - mlp64(x64)
    plain_out = mlp(x2).double()
    flag = comp.fp32_update
    try:
        comp.fp32_update = False
        gate = comp(a2, x2, gate0.clone(), mlp.up_proj(x2), s)[0]
        out = {"bf16": modulated_mlp(mlp, x2, comp, a2, s)[0]}
        comp.fp32_update = True
        out["fp32"] = modulated_mlp(mlp, x2, comp, a2, s)[0]
    finally:
        comp.fp32_update = flag
    dgate = gate.double() - gate0.double()
    row = {"layer": layer.layer_idx, "update_half_steps": float(half_steps(update, gate0.double()).median()),
           "update_over_gate": float((update.abs() / gate0.double().abs().clamp_min(1e-30)).median()),
           "gate_unchanged": float((dgate == 0).double().mean())}
    row["gate_rel_err"], row["gate_cos"] = _compare(dgate, update)
    for name, y in out.items():
        row[f"out_rel_err_{name}"], row[f"out_cos_{name}"] = _compare(y.double() - plain_out, want_out)
    row["update_over_output"] = float(want_out.norm() / plain_out.norm())
    return row


def survival(model: nn.Module, ids: torch.Tensor) -> list[dict]:
    captured, attn_kwargs = capture_teacher(model, ids)
    return [layer_survival(layer, captured[layer.layer_idx][0], attn_kwargs) for layer in npt_layers(model)]


def fused_step_cost(model: nn.Module, ids: torch.Tensor, repeats: int, device: str) -> dict:
    """Seconds per fused training step (forward + backward, no optimizer) with fp32_update off and on."""
    module = NPTTrainModule(model, NPTLoss(LossConfig(), len(npt_layers(model))))
    controls = StepControls(diagnostics=False)

    def step(flag: bool):
        def run():
            for layer in npt_layers(model):
                layer.np.fp32_update = flag
            loss, _ = module(ids, controls)
            module.loss_fn.finish_micro_batch(True)
            loss.backward()
            for p in module.parameters():
                p.grad = None
        return run

    try:
        times = interleaved({"bf16_update": step(False), "fp32_update": step(True)}, repeats, warmup=1,
                            device=device)
    finally:
        for layer in npt_layers(model):
            layer.np.fp32_update = True
    return {"fp32_update": stats(times["fp32_update"]), "bf16_update": stats(times["bf16_update"]),
            "fp32_over_bf16": ratio(times, "fp32_update", "bf16_update")}


def run_numerics(opts) -> dict:
    opts.dtype = "bf16"
    model = build_model(opts)
    if getattr(opts, "np_dir", None):  # trained weights onto the same conversion (--npt-layers, --dual as trained)
        load_np_weights(model, opts.np_dir)
    model.requires_grad_(False)
    for layer in npt_layers(model):
        layer.np.requires_grad_(True)
    ids = make_batch(opts, model)
    rows = survival(model, ids)
    result = {"config": {"shape": opts.shape, "device": opts.device, "dtype": "bf16", "seq": opts.seq,
                         "batch": opts.batch, "npt_layers": [r["layer"] for r in rows],
                         "np_weights": getattr(opts, "np_dir", None) or "init",
                         "modulation_scale": npt_layers(model)[0].modulation_scale},
              "rows": rows}
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k != "layer"}
    result["mean"] = mean
    if getattr(opts, "step_repeats", 0):
        result["step_cost"] = fused_step_cost(model, ids, opts.step_repeats, opts.device)
    result["targets"] = {
        "update_lost_in_bf16_gate": target(mean["gate_unchanged"], None, "",
                                           "share of gate elements a bf16 addition of the update leaves unchanged"),
        "output_update_rel_err_fp32": target(mean["out_rel_err_fp32"], 0.05, "<=",
                                             "fp32_update on: ‖Δoutput − exact‖ / ‖exact‖, layer mean"),
    }
    return result


def print_numerics(res: dict) -> str:
    c = res["config"]
    cols = [("layer", "layer", "d"), ("|U| / half step", "update_half_steps", ".3f"),
            ("|U| / |gate|", "update_over_gate", ".2e"), ("gate unchanged", "gate_unchanged", ".3f"),
            ("gate rel err", "gate_rel_err", ".3f"), ("gate cos", "gate_cos", ".3f"),
            ("out rel err bf16", "out_rel_err_bf16", ".3f"), ("out rel err fp32", "out_rel_err_fp32", ".4f"),
            ("out cos bf16", "out_cos_bf16", ".3f"), ("|ΔY| / |Y|", "update_over_output", ".2e")]
    lines = [format_table(res["rows"], cols, f"== numerics: {c['shape']} NP weights {c['np_weights']}, bf16 on "
                                             f"{c['device']}, seq {c['seq']} x {c['batch']}")]
    cost = res.get("step_cost")
    if cost:
        r = cost["fp32_over_bf16"]
        lines.append(f"fused step fwd+bwd: fp32_update {cost['fp32_update']['median_s'] * 1e3:.1f} ms, bf16 update "
                     f"{cost['bf16_update']['median_s'] * 1e3:.1f} ms (paired ratio {r['paired_median']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.numerics", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--npt-layers", default=None, help="default: the demo's 26-29 for smollm2, else bench.models'")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--num-ranks", type=int, default=1)
    p.add_argument("--dual", action=argparse.BooleanOptionalAction, default=True, help="the demo recipe's dual")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--np", dest="np_dir", default=None, help="trained NP weights (a checkpoint's np/ dir)")
    p.add_argument("--step-repeats", type=int, default=0, help="time the fused step with fp32_update off/on")
    p.add_argument("--json", default=None, help="also write the result here")
    opts = p.parse_args(argv)
    if opts.npt_layers is None and opts.shape == "smollm2":
        opts.npt_layers = "26-29"
    res = run_numerics(opts)
    print(print_numerics(res))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
