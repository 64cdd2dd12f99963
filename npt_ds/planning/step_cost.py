"""What one optimizer step costs per GPU under each ZeRO-3 frozen-base mode: bytes on each link, compute
(the NPT step's FLOPs at a stated MFU) and time; the byte model and its measurements are in
``docs/planner.md`` ("Step cost").
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .memory import PARAM_BYTES, PlanInputs, base_elem_bytes, plan_memory
from .shape import np_params_per_layer

MODES = ("partitioned", "resident", "hpz", "quantized")
DEFAULT_LINK_GBPS = (3600.0, 400.0)
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class LinkBytes:
    intra: float
    inter: float


def _split(message: float, world: int, per_node: int, node_only: bool = False) -> LinkBytes:
    """Per-GPU bytes of one collective's message on each link (ring-style share of the others' parts)."""
    if node_only:
        return LinkBytes(message * (per_node - 1) / per_node, 0.0)
    if world <= per_node:
        return LinkBytes(message * (world - 1) / world, 0.0)
    return LinkBytes(message * (per_node - 1) / world, message * (world - per_node) / world)


def step_flops(i: PlanInputs, grad_accum: int = 1, attention_core: bool = True) -> float:
    """FLOPs of one optimizer step per GPU (2 per multiply-add), per token summed over the step's tokens.

    With d, f, V, L the model's sizes, a = 2(d·q + 2·d·kv + q·d) the attention projections, layer =
    a + 6·d·f, r = rank, k = num_ranks, T = seq_len:

    * teacher forward: ``layer`` for every layer up to the last NPT one (all L, and 2·d·V of logits,
      when a student stream / logits run), plus the attention core 4·T·q per layer (``attention_core``);
    * per NPT layer, student forward: 6·d·f (the modulated MLP) + 2(d·r + r·k·d + r·k·f) (NP component);
    * its backward, without base-weight gradients: 2·d·f (down_proj's input gradient) + 2(d·r + d·r·k +
      2·r·k·f) (NP weight gradients and the gate's);
    * with a student stream the layer input carries a gradient too: + 4·d·f + 2·d·r·k (gate/up and q input
      gradients) + 2·a (the student's own attention, forward and input gradient); each frozen layer after
      the first NPT layer runs forward and input-gradient backward (2·layer), the logits likewise (4·d·V).

    Checked against ``torch.utils.flop_counter`` on the tiny model (tests/test_plan.py).  Activation
    checkpointing adds one more student-MLP forward per NPT layer + the NP component: 6·d·f under ZeRO-3,
    whose zero.Init replaces F.linear (for good) with a memory-saving autograd function that the recompute
    reruns to the end, and 4·d·f otherwise (torch's non-reentrant checkpoint stops recomputing once the saved
    inputs are back, so ``down_proj`` is not rerun).
    """
    s = i.shape
    d, f, v, r, k = s.hidden_size, s.intermediate_size, s.vocab_size, i.rank, i.num_ranks
    attn = 2 * (d * s.q_dim + 2 * d * s.kv_dim + s.q_dim * d)
    layer = attn + 6 * d * f
    core = 4 * i.seq_len * s.q_dim if attention_core else 0
    last, first, n = max(i.npt_layers), min(i.npt_layers), len(i.npt_layers)
    teacher_layers = s.num_layers if i.student_stream else last + 1
    flops = teacher_layers * (layer + core) + (2 * d * v if i.want_logits else 0)
    np_fwd = 2 * (d * r + r * k * (d + f))
    flops += n * (6 * d * f + np_fwd)  # student forward
    flops += n * (2 * d * f + 2 * (d * r + d * r * k + 2 * r * k * f))  # its backward
    if i.activation_checkpointing:  # see the docstring: down_proj is rerun only under ZeRO-3's own linear
        flops += n * ((6 if i.zero_stage == 3 else 4) * d * f + np_fwd)
    if i.student_stream:
        frozen_after = sum(1 for j in range(first + 1, s.num_layers) if j not in i.npt_layers)
        flops += n * (4 * d * f + 2 * d * r * k + 2 * attn + core)
        flops += frozen_after * 2 * (layer + core) + (4 * d * v if i.want_logits else 0)
    return float(flops * i.seq_len * i.micro_batch_size * grad_accum)


def mode_bytes(i: PlanInputs, mode: str, grad_accum: int = 1) -> dict[str, float]:
    """Message bytes per GPU per step: gathered, reduced, and their split on the two links."""
    elem = base_elem_bytes(i.precision, i.model_dtype)
    frozen = i.shape.base_bytes(i.quantization, elem)
    trainable = np_params_per_layer(i.shape.hidden_size, i.shape.intermediate_size, i.rank, i.num_ranks,
                                    dual=i.dual, multiplicative=i.multiplicative, down_bias=i.down_bias) \
        * len(i.npt_layers) \
        * PARAM_BYTES[i.precision]
    w, g, m = i.world_size, i.gpus_per_node, grad_accum
    reduced = m * trainable
    links = [_split(reduced, w, g)]
    if mode == "partitioned":
        gathered = m * (frozen + trainable)
        links.append(_split(gathered, w, g))
    elif mode == "resident":
        gathered = trainable
        links.append(_split(gathered, w, g))
    elif mode == "hpz":
        gathered = m * (frozen + trainable) + trainable
        links += [_split(m * (frozen + trainable), w, g, node_only=True), _split(trainable, w, g)]
    elif mode == "quantized":
        gathered = m * (frozen / elem + trainable)  # one byte per frozen element
        links.append(_split(gathered, w, g))
    else:
        raise ValueError(f"unknown frozen-base mode {mode!r}")
    return {"gathered": gathered, "reduced": reduced, "trainable": trainable, "frozen": frozen,
            "intra": sum(l.intra for l in links), "inter": sum(l.inter for l in links)}


def predict(i: PlanInputs, *, link_gbps: tuple[float, float] = DEFAULT_LINK_GBPS, grad_accum: int = 1,
            peak_tflops: float = DEFAULT_PEAK_TFLOPS, mfu: float = DEFAULT_MFU) -> list[dict]:
    """One row per frozen-base mode: memory fit, bytes, times, tokens/s per GPU."""
    flops = step_flops(i, grad_accum)
    compute_s = flops / (peak_tflops * 1e12 * mfu)
    tokens = i.seq_len * i.micro_batch_size * grad_accum
    rows = []
    for mode in MODES:
        plan = plan_memory(replace(i, frozen_base=mode, zero_stage=3))
        b = mode_bytes(i, mode, grad_accum)
        comm_s = max(b["intra"] * 8 / (link_gbps[0] * 1e9), b["inter"] * 8 / (link_gbps[1] * 1e9))
        step_s = compute_s + comm_s
        rows.append({"mode": mode, "fits": plan.fits, "mem_gib": plan.total / 2**30, **b, "compute_s": compute_s,
                     "comm_s": comm_s, "step_s": step_s, "tokens_per_s_per_gpu": tokens / step_s,
                     "flops": flops})
    return rows


PREFERENCE = ("resident", "hpz", "quantized", "partitioned")  # ties: least memory traffic first


def recommend(rows: list[dict], on_gpu: bool = True) -> tuple[str, str]:
    """(mode, why): the fastest mode that fits (quantized only on GPUs)."""
    usable = [r for r in rows if r["fits"] and (on_gpu or r["mode"] != "quantized")]
    if not usable:
        return "partitioned", "no mode fits this GPU memory; see the memory plan's suggestion"
    best = min(usable, key=lambda r: (round(r["step_s"], 6), PREFERENCE.index(r["mode"])))
    by = {r["mode"]: r for r in rows}
    why = f"fastest predicted step that fits ({best['step_s'] * 1e3:.1f} ms)"
    if best["mode"] != "resident" and not by["resident"]["fits"]:
        why += f"; resident needs {by['resident']['mem_gib']:.1f} GiB per GPU"
    return best["mode"], why


def format_prediction(rows: list[dict], recommended: tuple[str, str], link_gbps: tuple[float, float],
                      peak_tflops: float, mfu: float) -> str:
    lines = [f"ZeRO-3 frozen-base modes: links intra {link_gbps[0]:g} / inter {link_gbps[1]:g} Gbit/s per GPU, "
             f"compute at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s ({rows[0]['flops'] / 1e12:.1f} TFLOP/step)",
             f"{'mode':<12}{'fits':>5}{'GiB':>8}{'gather GB':>11}{'reduce GB':>11}{'intra GB':>10}{'inter GB':>10}"
             f"{'comm ms':>9}{'compute ms':>12}{'step ms':>9}{'tok/s/GPU':>11}"]
    for r in rows:
        lines.append(f"{r['mode']:<12}{'yes' if r['fits'] else 'no':>5}{r['mem_gib']:>8.1f}{r['gathered'] / 1e9:>11.3f}"
                     f"{r['reduced'] / 1e9:>11.4f}{r['intra'] / 1e9:>10.3f}{r['inter'] / 1e9:>10.3f}"
                     f"{r['comm_s'] * 1e3:>9.1f}{r['compute_s'] * 1e3:>12.1f}{r['step_s'] * 1e3:>9.1f}"
                     f"{r['tokens_per_s_per_gpu']:>11,.0f}")
    lines.append(f"recommended: deepspeed.frozen_base: {recommended[0]} ({recommended[1]})")
    return "\n".join(lines)
