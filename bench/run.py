"""Run the npt-ds benchmarks and write bench/results/<name>.json.

    python -m bench.run                       # micro + step + dist + data + ckpt (~35 min on 2 CPU cores)
    python -m bench.run --quick               # smaller and fewer repeats (~3 min)
    python -m bench.run --only micro,step --repeats 7
    python -m bench.run --only step --device cuda --dtype bf16 --shape llama-3.1-8b --peak-tflops 989
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

SECTIONS = ("micro", "step", "dist", "data", "ckpt")  # each is bench/<name>.py with run_<name>(opts), print_<name>(res)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma list of micro,step,dist (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller problem sizes and fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (micro default 9, step 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the single-process benches")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--shape", default="smollm2",
                   help="smollm2 (real weights), tiny, or a npt_ds/planning/shapes/*.json name such as llama-3.1-8b")
    p.add_argument("--num-layers", type=int, default=None, help="reduce num_hidden_layers of a --shape model")
    p.add_argument("--npt-layers", default=None, help="layers to convert (default: upper_half; 14-17 for 8B)")
    p.add_argument("--rank", type=int, default=None, help="NP rank (default 64)")
    p.add_argument("--num-ranks", type=int, default=1, help="k of the step benchmark")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ks", default="1,4,8", help="micro: num_ranks values")
    p.add_argument("--micro-tokens", type=int, default=256, help="micro: tokens per call")
    p.add_argument("--naive-tokens", type=int, default=16, help="micro: tokens for the naive ΔW comparison (0: skip)")
    p.add_argument("--inner", type=int, default=1, help="micro: calls averaged per timing")
    p.add_argument("--best-of", type=int, default=3, help="micro: a sample is the best of N timings")
    p.add_argument("--step-best-of", type=int, default=2, help="step: a sample is the best of N steps")
    p.add_argument("--step-variants", default="fused,two_pass,two_pass_reuse,plain,teacher_fwd,mixed,mixed_to_end,"
                                              "teacher_stage_to_end,kd_fidelity,kd_fidelity_adaptive")
    p.add_argument("--profile", action="store_true", help="step: torch.profiler top ops of fused and both two-pass variants")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip memory measurements")
    p.add_argument("--no-rss-probe", dest="rss_probe", action="store_false",
                   help="skip the per-variant peak-RSS subprocesses of the step bench")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU")
    p.add_argument("--dist-steps", type=int, default=12)
    p.add_argument("--dist-seq", type=int, default=128)
    p.add_argument("--dist-warmup", type=int, default=3, help="dist: train steps skipped as warm-up")
    p.add_argument("--dist-pairs", type=int, default=5,
                   help="dist: interleaved launches of each ZeRO-3 auto / ZeRO-2 pair (upper half and demo shape); "
                        "the ratio reported is the median of the pairs' ratios (0: skip)")
    p.add_argument("--dist-runs", default="z3_2r,z3_1r,z2_1r",
                   help="dist: runs among z3_2r,z2_2r,z3_1r,z2_1r (ZeRO stage _ ranks; ZeRO-3 partitioned), "
                        "z3auto_2r / z3hpz_2r (deepspeed.frozen_base auto / hpz), demo_z3auto_2r / demo_z2_2r (the "
                        "demo's shape: layers 26-29, micro-batch 2) and the experiments "
                        "z3p_2r,z3p_1r (persistent layer weights), z3leaf_2r,z3leaf_1r (non-NPT layers as leaves)")
    p.add_argument("--dist-rounds", type=int, default=1, help="dist: launches per run config, interleaved")
    p.add_argument("--dist-precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--sync-probe-model", default="tiny", choices=["tiny", "smollm2"],
                   help="dist: model of the host-sync probe (sync sites do not depend on model size)")
    p.add_argument("--no-sync-probe", dest="sync_probe", action="store_false",
                   help="dist: skip the host-sync profile of train_step")
    p.add_argument("--data-steps", type=int, default=16, help="data: demo steps per data source")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve(opts: argparse.Namespace) -> argparse.Namespace:
    only = [s.strip() for s in opts.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        raise SystemExit(f"--only: unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    opts.sections = only
    opts.ks = [int(k) for k in str(opts.ks).split(",")]
    opts.step_variants = [v.strip() for v in str(opts.step_variants).split(",")]
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    elif opts.dtype == "bf16":
        print("note: bf16 on CPU is slow and not representative of GPU behaviour", file=sys.stderr)
    if opts.quick:
        opts.micro_tokens = min(opts.micro_tokens, 128)
        opts.naive_tokens = min(opts.naive_tokens, 8)
        opts.best_of = min(opts.best_of, 2)
        opts.step_best_of = 1
        opts.seq = min(opts.seq, 128)
        opts.dist_steps = min(opts.dist_steps, 8)
        opts.dist_warmup = min(opts.dist_warmup, 2)
        opts.dist_runs = "z3_2r,z3auto_2r,z2_2r" \
            if opts.dist_runs == "z3_2r,z3auto_2r,z2_2r,z3_1r,z2_1r,demo_z3auto_2r,demo_z2_2r" else opts.dist_runs
    opts.repeats = opts.repeats or (3 if opts.quick else 9)
    opts.step_repeats = opts.repeats if opts.repeats <= 5 else max(5, opts.repeats // 2)
    if opts.quick:
        opts.step_repeats = min(opts.step_repeats, 3)
    return opts


def result_name(section: str, opts) -> str:
    name = section
    if opts.shape != "smollm2" and section != "dist":
        name += f"-{opts.shape}" + (f"-{opts.num_layers}l" if opts.num_layers else "")
    if opts.device != "cpu" or opts.dtype != "fp32":
        name += f"-{opts.device.replace(':', '')}-{opts.dtype}"
    if opts.quick:
        name += "-quick"
    return name


def run_section(section: str, opts) -> dict:
    """The function behind `--only SECTION`: returns the results dict (with env info and timing)."""
    from .common import env_info, set_threads

    set_threads(opts.threads)
    t0 = time.time()
    res = getattr(importlib.import_module(f"bench.{section}"), f"run_{section}")(opts)
    res["env"] = env_info(opts.device)
    res["wall_s"] = round(time.time() - t0, 1)
    res["name"] = result_name(section, opts)
    return res


def print_section(section: str, res: dict) -> str:
    text = getattr(importlib.import_module(f"bench.{section}"), f"print_{section}")(res)
    for name, t in res.get("targets", {}).items():
        v = t["value"]
        shown = "-" if v is None else f"{v:.3f}"
        if t["threshold"] is None:
            text += f"\nreported {name}: {t['description']} = {shown}"
            continue
        mark = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        text += f"\ntarget {name}: {t['description']} = {shown} (want {t['op']} {t['threshold']}) {mark}"
    return text


def main(argv: list[str] | None = None) -> int:
    opts = resolve(build_parser().parse_args(argv))
    from .common import write_results

    summary = {}
    for section in opts.sections:
        print(f"\n### {section} ...", flush=True)
        res = run_section(section, opts)
        path = write_results(res["name"], res, opts.out)
        print(print_section(section, res))
        print(f"({res['wall_s']} s) -> {path}", flush=True)
        summary[section] = res.get("targets", {})
    print("\n" + json.dumps({s: {k: (t["value"], t["met"]) for k, t in v.items()} for s, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
