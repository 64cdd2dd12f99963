"""``npt-ds plan CONFIG.yaml --nodes N --gpus-per-node G --gpu-mem 80``: the per-GPU memory table of a recipe
(FITS / DOES NOT FIT and one suggestion) and the step-time table of each ZeRO-3 frozen-base mode."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ..config import ConfigError, load_config
from .inputs import inputs_from_config
from .memory import GIB, TERM_LABELS, Plan, make_plan, suggest
from .step_cost import DEFAULT_LINK_GBPS, DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, format_prediction, predict, recommend

HELP = "per-GPU memory plan for a config (no weights, no GPU)"
DESCRIPTION = "Estimate per-GPU memory of NPT training under DeepSpeed ZeRO from the config and the model's config.json alone."


def format_plan(plan: Plan) -> str:
    """The human-readable table."""
    i = plan.inputs
    s = i.shape
    layers = _format_layers(i.npt_layers)
    lines = [
        f"npt-ds plan: {s.name} ({_count(plan.params['base_total'])} params, {s.num_layers} layers), "
        f"NPT layers {layers} ({len(i.npt_layers)}), rank {i.rank} x {i.num_ranks} ranks "
        f"= {_count(plan.params['trainable'])} trainable",
        f"ZeRO-{i.zero_stage}, {i.precision}, base {i.quantization if i.quantization != 'none' else 'unquantised'}, "
        f"{i.nodes} node(s) x {i.gpus_per_node} GPU(s) = {i.world_size}, seq {i.seq_len} x micro-batch "
        f"{i.micro_batch_size}, activation checkpointing {'on' if i.activation_checkpointing else 'off'}, "
        f"student stream {'on' if i.student_stream else 'off'}, logits {'on' if i.want_logits else 'off'}",
        "",
        f"{'per GPU':<22}{'GiB':>10}",
        "-" * 32,
    ]
    for key, value in plan.terms.items():
        lines.append(f"{TERM_LABELS[key]:<22}{value / GIB:>10.2f}")
    lines += ["-" * 32, f"{'total':<22}{plan.total / GIB:>10.2f}", f"{'GPU memory':<22}{i.gpu_mem_gib:>10.2f}"]
    alt = "with" if not i.activation_checkpointing else "without"
    lines.append(f"(activations {alt} checkpointing: {plan.activations_alt / GIB:.2f} GiB)")
    if plan.fits:
        lines.append(f"FITS (headroom {(plan.gpu_mem_bytes - plan.total) / GIB:.2f} GiB)")
    else:
        lines.append(f"DOES NOT FIT (short by {(plan.total - plan.gpu_mem_bytes) / GIB:.2f} GiB)")
        lines.append(plan.suggestion or suggest(plan) or "")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else str(n)


def _format_layers(layers: Sequence[int]) -> str:
    out, start = [], None
    seq = sorted(layers)
    for n, v in enumerate(seq):
        if start is None:
            start = v
        if n + 1 == len(seq) or seq[n + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def add_plan_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plan`` on an ``argparse`` subparsers object; ``args.func`` is :func:`run_plan`."""
    p = subparsers.add_parser("plan", help=HELP, description=DESCRIPTION)
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)
    return p


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", help="run recipe")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0,
                   help="memory per GPU in GiB (default 80; an '80 GB' H100 shows 79.6 GiB to CUDA)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="override deepspeed.zero_stage / the DeepSpeed JSON's stage")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="override model.activation_checkpointing")
    p.add_argument("--override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. data.seq_len=4096 (repeatable)")
    p.add_argument("--link-gbps", default=",".join(f"{v:g}" for v in DEFAULT_LINK_GBPS), metavar="INTRA,INTER",
                   help="per-GPU link bandwidths in Gbit/s for the step-time table (default %(default)s: NVLink 4, "
                        "one 400G InfiniBand port per GPU)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="GPU peak (default %(default)s: H100 dense bf16)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation assumed (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON dict")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; 0 = fits, 1 = does not fit, 2 = bad config / arguments."""
    try:
        cfg = load_config(args.config, args.override)
        inputs = inputs_from_config(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                    gpu_mem_gib=args.gpu_mem, zero_stage=args.zero_stage,
                                    activation_checkpointing=args.activation_checkpointing)
        plan = make_plan(inputs)
        links = _link_gbps(args.link_gbps)
        rows = predict(inputs, link_gbps=links, grad_accum=cfg.optim.grad_accum, peak_tflops=args.peak_tflops,
                       mfu=args.mfu)
        recommended = recommend(rows)
    except ConfigError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}))
        else:
            print(f"error: {exc}")
        return 2
    if args.json:
        print(json.dumps({**plan.to_dict(), "frozen_base_modes": rows,
                          "recommended_frozen_base": {"mode": recommended[0], "why": recommended[1]}}, indent=2))
    else:
        print(format_plan(plan))
        print()
        print(format_prediction(rows, recommended, links, args.peak_tflops, args.mfu))
    return 0 if plan.fits else 1


def _link_gbps(text: str) -> tuple[float, float]:
    try:
        intra, inter = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--link-gbps: {text!r} is not INTRA,INTER in Gbit/s, e.g. 3600,400") from None
    if intra <= 0 or inter <= 0:
        raise ConfigError("--link-gbps: both bandwidths must be > 0")
    return intra, inter


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m npt_ds.planning.cli CONFIG.yaml ...``."""
    parser = argparse.ArgumentParser(prog="npt-ds")
    add_plan_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
