"""Distributed benchmark: the real trainer (`npt_ds.train`) under DeepSpeed on CPU ranks.

Runs (each a fresh launch with a temp YAML recipe; single-layer mode, SmolLM2-135M, upper half):

* ``z3_2r`` -- ZeRO-3, 2 ranks: `deepspeed --num_gpus 2 --module npt_ds.train --config X.yaml`,
               OMP_NUM_THREADS=1 per rank, ds_configs/zero3_fp32.json (+ log_trace_cache_warnings)
* ``z2_2r`` -- ZeRO-2, 2 ranks, ds_configs/zero2_bf16.json with precision fp32
* ``z2_1r`` / ``z3_1r`` -- one process (`python -m npt_ds.train X.yaml`), OMP_NUM_THREADS=2
* experiments (not run by default): ``z3p_*`` ZeRO-3 with every per-layer weight persistent (only the
  embedding partitioned); ``z3leaf_*`` ZeRO-3 with the non-NPT decoder layers as ZeRO-3 leaf modules
  (bench/dist_worker.py monkeypatch of the trainer)

tokens/s is read from RUN_DIR/metrics.jsonl ("event": "train" lines, global tokens over the log
window), skipping the first `--dist-warmup` steps.  Rank logs are scanned for DeepSpeed's
"Invalidate trace cache" messages (enabled through `zero_optimization.log_trace_cache_warnings`)
and each is attributed to the training step during which it was printed.  A separate 2-rank probe
(bench/sync_probe.py) profiles `Trainer.train_step` and counts host syncs and collectives per step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO_ROOT, format_table, target

RUNS = {  # name -> (ZeRO stage, ranks, DeepSpeed template, zero_optimization overrides)
    "z3_2r": (3, 2, "ds_configs/zero3_fp32.json", {}),
    "z2_2r": (2, 2, "ds_configs/zero2_bf16.json", {}),
    "z3_1r": (3, 1, "ds_configs/zero3_fp32.json", {}),
    "z2_1r": (2, 1, "ds_configs/zero2_bf16.json", {}),
    # ZeRO-3 with every per-layer weight (< 1M elements) persistent: only the 28M-element
    # embedding stays partitioned -- isolates the cost of gathering the frozen layer weights
    "z3p_2r": (3, 2, "ds_configs/zero3_fp32.json", {"stage3_param_persistence_threshold": 1_000_000,
                                                     "stage3_model_persistence_threshold": 10**12}),
    # ZeRO-3 with the non-NPT decoder layers as leaf modules (bench/dist_worker.py patch)
    "z3leaf_2r": (3, 2, "ds_configs/zero3_fp32.json", {}),
    "z3leaf_1r": (3, 1, "ds_configs/zero3_fp32.json", {}),
    "z3p_1r": (3, 1, "ds_configs/zero3_fp32.json", {"stage3_param_persistence_threshold": 1_000_000,
                                                    "stage3_model_persistence_threshold": 10**12}),
}
RUNS.update({  # deepspeed.frozen_base (npt_ds.parallel.devices); every other ZeRO-3 run is the plain partitioned one
    "z3auto_2r": (3, 2, "ds_configs/zero3_fp32.json", {}),
    "z3hpz_2r": (3, 2, "ds_configs/zero3_fp32.json", {}),
})
RUNS.update({  # the demo's shape (configs/smollm2_demo.yaml: layers 26-29, micro-batch 2): the target's pair
    "demo_z3auto_2r": (3, 2, "ds_configs/zero3_fp32.json", {}),
    "demo_z2_2r": (2, 2, "ds_configs/zero2_bf16.json", {}),
})
FROZEN_BASE = {"z3auto_2r": "auto", "z3hpz_2r": "hpz", "demo_z3auto_2r": "auto"}
SHAPES = {"demo_z3auto_2r": ("26-29", 2), "demo_z2_2r": ("26-29", 2)}  # (NPT layers, micro-batch); else upper half, 1
PATCHES = {"z3leaf_2r": ["z3_leaf"], "z3leaf_1r": ["z3_leaf"]}
TRACE_RE = re.compile(r"Invalidate trace cache @ step (\d+)")
PROGRESS_RE = re.compile(r"step\s+(\d+)/(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(work: Path, name: str, stage: int, template: str, opts, model: str = "smollm2",
                 layers: str = "upper_half", steps: int | None = None, zero: dict | None = None,
                 frozen_base: str = "partitioned", micro_batch: int = 1, extra: dict | None = None) -> Path:
    """A YAML recipe + DeepSpeed JSON (trace warnings on) for one run; returns the YAML path.  `extra` maps a
    recipe section to keys that replace or add to the section's (e.g. {"data": {"source": "prepared", ...}})."""
    ds = json.loads((REPO_ROOT / template).read_text())
    ds.setdefault("zero_optimization", {})["log_trace_cache_warnings"] = True
    ds["zero_optimization"].update(zero or {})
    ds_path = work / f"{name}.ds.json"
    ds_path.write_text(json.dumps(ds, indent=1))
    precision = getattr(opts, "dist_precision", "fp32")
    tiny = model == "tiny"
    recipe = {
        "run_name": f"bench-{name}",
        "seed": 0,
        "model": {"path": model, "dtype": "float32"},
        "npt": {"layers": layers, "rank": 8 if tiny else 64, "num_ranks": 1},
        "data": {"source": "shakespeare", "seq_len": 32 if tiny else opts.dist_seq, "micro_batch_size": micro_batch,
                 "eval_seq_len": 32, "eval_batches": 1},
        "schedule": {"mode": "single_layer", "total_steps": steps or opts.dist_steps, "warmup_steps": 2},
        "optim": {"lr": 1.0e-3},
        "deepspeed": {"config": str(ds_path), "precision": precision, "zero_stage": stage,
                      "frozen_base": frozen_base},
        "checkpoint": {"every": 0, "save_final": False, "resume": "none"},
        "logging": {"run_dir": str(work / f"run-{name}"), "log_every": 1, "eval_every": 0, "console": True},
    }
    for section, keys in (extra or {}).items():
        recipe.setdefault(section, {}).update(keys)
    path = work / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def launch_cmd(ranks: int, module: str, recipe: Path, extra: list[str] | None = None) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", module, "--config", str(recipe), *(extra or [])]
    launcher = Path(sys.executable).parent / "deepspeed"
    launcher = str(launcher) if launcher.exists() else (shutil.which("deepspeed") or "deepspeed")
    return [launcher, "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "--module", module, "--config", str(recipe), *(extra or [])]


def run_env(ranks: int, total_threads: int = 2) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(max(1, total_threads // ranks)), MKL_NUM_THREADS=str(max(1, total_threads // ranks)),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if "TORCH_EXTENSIONS_DIR" not in env:  # see ext_cache_dir()
        env["TORCH_EXTENSIONS_DIR"] = str(ext_cache_dir())
    return env


def ext_cache_dir() -> Path:
    """A per-virtualenv JIT-extension cache for DeepSpeed's shm_comm op.

    Several checkouts/venvs sharing ~/.cache/torch_extensions compile shm_comm with different
    include paths; ninja then sees a changed command line and rebuilds it (40-90 s on 2 busy
    cores) on almost every launch.  Keying the cache by sys.prefix builds it once per venv.
    """
    import hashlib

    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "torch_extensions" / f"venv-{key}"


def parse_metrics(path: Path, warmup: int) -> dict:
    records, start = [], {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "train":
                records.append(rec)
            elif rec.get("event") == "start":
                start = rec
    steady = [r for r in records if r["step"] > warmup]
    tps = [r["tokens_per_s"] for r in steady]
    out = {"train_records": len(records), "steady_steps": len(steady), "steady_tokens_per_s": tps,
           "tokens_per_s_median": statistics.median(tps) if tps else None,
           "tokens_per_s_all": [r["tokens_per_s"] for r in records],
           "losses": [r.get("loss/total") for r in records],
           "loss_first": records[0].get("loss/total") if records else None,
           "loss_last": records[-1].get("loss/total") if records else None,
           "frozen_base": start.get("run/frozen_base"), "trainable_params": start.get("run/trainable_params")}
    for kind in ("gather", "reduce"):  # this rank's (rank 0's) collective bytes per steady step
        values = [r[f"comm/{kind}_gb_per_step"] for r in steady if f"comm/{kind}_gb_per_step" in r]
        out[f"{kind}_gb_per_step"] = statistics.median(values) if values else None
    return out


def scan_trace_warnings(log: str) -> dict:
    """Count ZeRO-3 trace invalidations and the training step during which each was printed."""
    step, per_step, events = 0, {}, 0
    for token in re.split(r"[\r\n]", log):
        m = PROGRESS_RE.search(token)
        if m and "tok/s" in token:
            step = int(m.group(1))
        if TRACE_RE.search(token):
            events += 1
            per_step[step + 1] = per_step.get(step + 1, 0) + 1  # printed while running step `step`+1
    return {"invalidations": events, "by_train_step": per_step}


def merge_rounds(runs: list[dict]) -> dict:
    """One summary per run config: steady tokens/s pooled over rounds (median and best)."""
    out = dict(runs[0])
    steady = [v for r in runs for v in r.get("steady_tokens_per_s", [])]
    out["rounds"] = len(runs)
    out["rc"] = max(r["rc"] for r in runs)
    out["tokens_per_s_median"] = statistics.median(steady) if steady else None
    out["tokens_per_s_best"] = max(steady) if steady else None
    out["round_medians"] = [r.get("tokens_per_s_median") for r in runs]
    out["steady_steps"] = len(steady)
    out["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    out["trace"] = {"invalidations": sum(r["trace"]["invalidations"] for r in runs),
                    "by_train_step": runs[0]["trace"]["by_train_step"],
                    "per_round": [r["trace"]["invalidations"] for r in runs]}
    if out["tokens_per_s_median"]:
        out["s_per_step"] = out["tokens_per_step"] / out["tokens_per_s_median"]
    return out


def run_one(name: str, opts, work: Path, tag: str | None = None) -> dict:
    stage, ranks, template, zero = RUNS[name]
    tag = tag or name
    layers, micro_batch = SHAPES.get(name, ("upper_half", 1))
    recipe = write_recipe(work, tag, stage, template, opts, zero=zero, frozen_base=FROZEN_BASE.get(name, "partitioned"),
                          layers=layers, micro_batch=micro_batch)
    patches = PATCHES.get(name, [])
    cmd = launch_cmd(ranks, "bench.dist_worker" if patches else "npt_ds.train", recipe,
                     ["--patch", ",".join(patches)] if patches else None)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(ranks, opts.threads), text=True, capture_output=True,
                          timeout=opts.dist_timeout)
    wall = time.time() - t0
    log = proc.stdout + "\n" + proc.stderr
    (work / f"{tag}.log").write_text(log)
    res = {"run": name, "zero_stage": stage, "ranks": ranks, "threads_per_rank": max(1, opts.threads // ranks),
           "template": template, "zero_overrides": zero, "patches": patches,
           "precision": getattr(opts, "dist_precision", "fp32"), "rc": proc.returncode,
           "wall_s": round(wall, 1), "cmd": " ".join(cmd), "log": str(work / f"{tag}.log"),
           "tokens_per_step": opts.dist_seq * ranks * micro_batch, "npt_layers": layers, "recipe": str(recipe)}
    res.update(parse_metrics(work / f"run-{tag}" / "metrics.jsonl", opts.dist_warmup))
    res["trace"] = scan_trace_warnings(log)
    if proc.returncode != 0:
        res["error_tail"] = log.strip()[-1500:]
    return res


PAIRS = {"upper_half": ("z3auto_2r", "z2_2r"), "demo": ("demo_z3auto_2r", "demo_z2_2r")}


def run_pairs(a: str, b: str, opts, work: Path) -> dict:
    """`opts.dist_pairs` launches of a and b, interleaved and in alternating order (a b, b a, ...), so a drift of
    this machine's speed cannot decide the ratio: each pair's ratio of median tokens/s, and their median; and the
    largest difference between the two runs' losses at any step (the same model, data and updates)."""
    ratios, diffs, runs = [], [], {a: [], b: []}
    for k in range(opts.dist_pairs):
        got = {}
        for name in ((a, b) if k % 2 == 0 else (b, a)):
            print(f"  dist pair {a}/{b} {k + 1}: {name} ...", flush=True)
            got[name] = run_one(name, opts, work, tag=f"{name}-pair{k}")
            runs[name].append(got[name])
        if got[a].get("tokens_per_s_median") and got[b].get("tokens_per_s_median"):
            ratios.append(got[a]["tokens_per_s_median"] / got[b]["tokens_per_s_median"])
        la, lb = got[a].get("losses", []), got[b].get("losses", [])
        diffs.append(max((abs(x - y) for x, y in zip(la, lb)), default=float("inf")) if la and len(la) == len(lb)
                     else float("inf"))
    return {"pair_ratios": [round(r, 4) for r in ratios], "ratio_median": statistics.median(ratios) if ratios else None,
            "max_loss_diff": max(diffs) if diffs else None, "runs": {n: merge_rounds(v) for n, v in runs.items()}}


def run_sync_probe(opts, work: Path) -> dict:
    """2-rank ZeRO-3 profile of Trainer.train_step: host syncs (.item()/bool()) and collectives per step."""
    model = getattr(opts, "sync_probe_model", "tiny")
    layers = "2,3" if model == "tiny" else "upper_half"
    recipe = write_recipe(work, f"probe_{model}", 3, RUNS["z3_2r"][2], opts, model=model, layers=layers,
                          steps=12)
    out = work / f"probe_{model}.json"
    cmd = launch_cmd(2, "bench.sync_probe", recipe, ["--out", str(out), "--warm", "3", "--steps", "3"])
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(2, opts.threads), text=True, capture_output=True,
                          timeout=opts.dist_timeout)
    (work / f"probe_{model}.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"sync probe failed (rc {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}"}
    res = json.loads(out.read_text())
    res["model"], res["npt_layers"] = model, layers
    return res


def run_dist(opts) -> dict:
    opts.dist_timeout = getattr(opts, "dist_timeout", 900)
    work = Path(tempfile.mkdtemp(prefix="npt-bench-dist-"))
    names = [n.strip() for n in str(opts.dist_runs).split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--dist-runs: unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    result: dict = {"config": {"model": "smollm2", "npt_layers": "upper_half", "mode": "single_layer",
                               "seq": opts.dist_seq, "micro_batch": 1, "steps": opts.dist_steps,
                               "warmup_skipped": opts.dist_warmup, "precision": getattr(opts, "dist_precision", "fp32"),
                               "work_dir": str(work)}, "runs": [], "ratios": {}}
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(max(1, opts.dist_rounds)):  # launches interleaved round by round
        for name in names:
            print(f"  dist run {name} (round {r + 1}) ...", flush=True)
            rounds[name].append(run_one(name, opts, work, tag=f"{name}-r{r}"))
    for name in names:
        result["runs"].append(merge_rounds(rounds[name]))
    by = {r["run"]: r for r in result["runs"]}

    def tps(n):
        return by.get(n, {}).get("tokens_per_s_median")

    z3 = by.get("z3_2r", {}).get("trace", {})
    result["trace_cache"] = {  # by_train_step: N+1 (N = total steps) = printed after the last step (final eval)
        "z3_2r_invalidations": z3.get("invalidations"),
        "z3_2r_by_train_step": z3.get("by_train_step"),
        "invalidated_every_step": (max(z3["per_round"]) >= opts.dist_steps - 1) if z3 else None,
    }
    if "z2_1r" in by and by["z2_1r"].get("s_per_step"):
        print("  dist step-time prediction (gloo bandwidth probe) ...", flush=True)
        result["prediction"] = predict_cpu_runs(by, opts)
    if opts.sync_probe:
        print("  dist sync probe ...", flush=True)
        result["sync_probe"] = run_sync_probe(opts, work)
    if getattr(opts, "dist_pairs", 0):
        result["pairs"] = {shape: run_pairs(a, b, opts, work) for shape, (a, b) in PAIRS.items()}
        for shape, pair in result["pairs"].items():  # a pair's runs stand in for runs not launched on their own
            for name in PAIRS[shape]:
                by.setdefault(name, pair["runs"][name])
    for a, b in (("z2_2r", "z3_2r"), ("z2_1r", "z3_2r"), ("z3_1r", "z3_2r"), ("z2_1r", "z2_2r"),
                 ("z3p_2r", "z3_2r"), ("z3leaf_2r", "z3_2r"), ("z2_2r", "z3leaf_2r"), ("z2_1r", "z3_1r"),
                 ("z3leaf_1r", "z3_1r"), ("z3p_1r", "z3_1r"), ("z3auto_2r", "z2_2r"), ("z3auto_2r", "z3_2r"),
                 ("z3hpz_2r", "z3_2r"), ("demo_z3auto_2r", "demo_z2_2r")):
        if tps(a) and tps(b):
            result["ratios"][f"tokens_per_s {a}/{b}"] = tps(a) / tps(b)
    auto = by.get("demo_z3auto_2r") or by.get("z3auto_2r", {})
    trainable_gb = (auto.get("trainable_params") or 0) * 4 / 1e9  # fp32 trainable parameters
    pairs = result.get("pairs", {})
    result["targets"] = {
        "zero3_auto_vs_zero2": target(pairs.get("demo", {}).get("ratio_median"), 0.97, ">=",
                                      "demo shape: ZeRO-3 (frozen_base auto) ÷ ZeRO-2 tokens/s, 2 ranks, median of "
                                      "interleaved pairs (identical losses)"),
        "zero3_auto_vs_zero2_upper_half": target(pairs.get("upper_half", {}).get("ratio_median"), 0.97, ">=",
                                                 "upper half (15 NPT layers): the same"),
        "zero3_auto_vs_zero2_losses": target(max((p["max_loss_diff"] for p in pairs.values()), default=None), 1e-6,
                                             "<=", "largest |loss difference| between the runs of a pair, any step"),
        "zero3_auto_gather_vs_trainable": target(auto["gather_gb_per_step"] / trainable_gb
                                                 if auto.get("gather_gb_per_step") is not None and trainable_gb
                                                 else None, 2.0, "<=",
                                                 "ZeRO-3 (auto) gathered bytes per step ÷ trainable parameter bytes"),
        "zero3_overhead_vs_zero2": target(result["ratios"].get("tokens_per_s z2_2r/z3_2r"), None, "",
                                          "ZeRO-2 tokens/s ÷ ZeRO-3 (partitioned) tokens/s, 2 ranks, upper half"),
        "zero3_overhead_vs_one_rank": target(result["ratios"].get("tokens_per_s z2_1r/z3_2r"), None, "",
                                             "1-rank (ZeRO-2) tokens/s ÷ ZeRO-3 2-rank tokens/s"),
    }
    return result


def predict_cpu_runs(by: dict, opts) -> dict:
    """npt_ds.planning.step_cost's model on this CPU: compute from the NPT step FLOPs at the FLOP rate of the 1-rank
    ZeRO-2 run (2 threads; a 2-rank run has 1 thread per rank), communication = the planner's message bytes
    at the all-gather bandwidth gloo reaches on loopback (bench/gloo_probe.py)."""
    from npt_ds.config import load_config
    from npt_ds.planning.inputs import inputs_from_config
    from npt_ds.planning.step_cost import mode_bytes, step_flops

    probe = subprocess.run([sys.executable, "-m", "bench.gloo_probe", "64", "5"], cwd=REPO_ROOT, text=True,
                           capture_output=True, env=run_env(2, opts.threads), timeout=300)
    bw = json.loads(probe.stdout.strip().splitlines()[-1])["message_gb_per_s"] * 1e9

    def inputs(run):
        return inputs_from_config(load_config(run["recipe"], []), nodes=1, gpus_per_node=run["ranks"], gpu_mem_gib=24)

    ref = by["z2_1r"]
    per_thread_flops = step_flops(inputs(ref)) / ref["s_per_step"] / max(1, opts.threads)
    rows = []
    for name, run in by.items():
        if run["ranks"] != 2 or not run.get("s_per_step"):
            continue
        i = inputs(run)
        mode = run.get("frozen_base") if run["zero_stage"] == 3 else "resident"  # ZeRO-2: the base is resident
        b = mode_bytes(i, mode)
        compute = step_flops(i) / (per_thread_flops * max(1, opts.threads // 2))
        comm = (b["gathered"] + b["reduced"]) / bw
        rows.append({"run": name, "measured_s": run["s_per_step"], "predicted_s": compute + comm, "compute_s": compute,
                     "comm_s": comm, "predicted_gather_gb": b["gathered"] / 1e9,
                     "measured_gather_gb": run.get("gather_gb_per_step")})
    return {"gloo_message_gb_per_s": bw / 1e9, "per_thread_gflops": per_thread_flops / 1e9, "rows": rows}


def _num(value, spec: str) -> str:
    """`value` formatted, or "n/a" for a figure a failed run left out."""
    return "n/a" if value is None else format(value, spec)


def print_dist(res: dict) -> str:
    cols = [("run", "run", ""), ("stage", "zero_stage", "d"), ("ranks", "ranks", "d"),
            ("thr/rank", "threads_per_rank", "d"), ("rc", "rc", "d"),
            ("tokens/s (median)", "tokens_per_s_median", ",.1f"), ("best", "tokens_per_s_best", ",.1f"),
            ("s/step", "s_per_step", ".3f"), ("rounds", "rounds", "d"),
            ("steady steps", "steady_steps", "d"), ("wall s", "wall_s", ".0f"), ("frozen base", "frozen_base", ""),
            ("gather GB/step", "gather_gb_per_step", ".4f"), ("reduce GB/step", "reduce_gb_per_step", ".4f"),
            ("loss first", "loss_first", ".4g"),
            ("loss last", "loss_last", ".4g")]
    rows = [dict(r, trace_n=r["trace"]["invalidations"]) for r in res["runs"]]
    cols.append(("trace invalidations", "trace_n", "d"))
    c = res["config"]
    lines = [format_table(rows, cols, f"== dist: SmolLM2 {c['npt_layers']}, seq {c['seq']} x {c['micro_batch']}, "
                                      f"{c['steps']} steps ({c['warmup_skipped']} warm-up skipped), {c['precision']}")]
    for k, v in res["ratios"].items():
        lines.append(f"{k} = {_num(v, '.3f')}")
    for shape, pair in res.get("pairs", {}).items():
        a, b = PAIRS[shape]
        lines.append(f"{shape}: {a}/{b} tokens/s over {len(pair['pair_ratios'])} interleaved pairs: median "
                     f"{_num(pair['ratio_median'], '.3f')} (pairs {pair['pair_ratios']}); largest loss difference "
                     f"{_num(pair['max_loss_diff'], '.2g')}")
    pred = res.get("prediction")
    if pred:
        lines.append(f"step-time prediction (npt_ds.planning.step_cost on this CPU: {pred['per_thread_gflops']:.1f} GFLOP/s per "
                     f"thread from z2_1r, gloo all-gather {pred['gloo_message_gb_per_s']:.2f} GB/s):")
        for r in pred["rows"]:
            lines.append(f"   {r['run']:<16} measured {r['measured_s']:.3f} s/step, predicted {r['predicted_s']:.3f} "
                         f"(compute {r['compute_s']:.3f} + comm {r['comm_s']:.3f}); gathered GB/step predicted "
                         f"{r['predicted_gather_gb']:.4f}, measured {r['measured_gather_gb']}")
    tc = res["trace_cache"]
    lines.append(f"ZeRO-3 trace invalidations (2 ranks): {tc['z3_2r_invalidations']} at train steps "
                 f"{tc['z3_2r_by_train_step']}; every step: {tc['invalidated_every_step']}")
    for r in res["runs"]:
        if r.get("error_tail"):
            lines.append(f"{r['run']} FAILED:\n{r['error_tail']}")
    sp = res.get("sync_probe")
    if sp:
        if "error" in sp:
            lines.append(sp["error"])
        else:
            lines.append(f"host syncs per train_step (ZeRO-3, 2 ranks, {sp['model']}): "
                         f"{sp['syncs_per_step']:.1f} (.item()/bool()/float() -> _local_scalar_dense); "
                         f"collectives per step: {sp['collectives_per_step']}")
            for site, n in sp["sync_sites"].items():
                lines.append(f"   {n / sp['steps']:.1f}/step  {site}")
            fix = sp.get("with_no_mask_sync_patch")
            if fix:
                lines.append("   with fused.py's create_causal_mask(position_ids=None): "
                             f"{fix['syncs_per_step']:.1f}/step")
    return "\n".join(lines)
