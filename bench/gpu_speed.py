"""gpu-check part 3: NPT training speed under DeepSpeed on one GPU, against `npt-ds plan`'s predictions.

Each run is ``python -m bench.dist_worker --patch shape_model,clock_check --config RECIPE`` in a fresh process:
the real trainer, a world of one (NCCL on a GPU; gloo in the CPU smoke), bf16, on a prepared corpus of random
tokens, the base a shape preset with random weights made on the device (nothing downloaded).  From its
metrics.jsonl, after the warm-up steps: step time, tokens/s, ``perf/mfu``, peak memory, and the ratio of each to the
planner's prediction for the same recipe (npt_ds/planning: ``plan_memory`` for memory, ``predict`` for the step
at the planner's default MFU of 0.4 and this device's peak).  The clock check compares the CUDA-event own step
time (``rank/{r}/step_s`` on a GPU) with wall time less host-blocked collective time; both are rank 0's.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npt_ds.config import load_config
from npt_ds.data.prepared import FORMAT, INDEX, VERSION, token_dtype, tokenizer_name, vocab_hash
from npt_ds.model import ByteTokenizer
from npt_ds.planning.inputs import inputs_from_config
from npt_ds.planning.memory import plan_memory
from npt_ds.planning.step_cost import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, predict

from .common import REPO_ROOT
from .dist import launch_cmd, run_env, write_recipe

TEMPLATES = {3: "ds_configs/zero3_bf16.json", 2: "ds_configs/zero2_bf16.json"}


@dataclass(frozen=True)
class SpeedRun:
    shape: str  # a planning shape preset (random weights), or "tiny"
    layers: str
    stage: int
    frozen_base: str = "resident"  # ZeRO-3's mode; ZeRO-2 keeps the whole base anyway

    @property
    def name(self) -> str:
        mode = f"z3-{self.frozen_base}" if self.stage == 3 else "z2"
        return f"{self.shape}-{self.layers}-{mode}"


def _trio(shape: str, layers: str) -> list[SpeedRun]:
    return [SpeedRun(shape, layers, 3, "resident"), SpeedRun(shape, layers, 2),
            SpeedRun(shape, layers, 3, "partitioned")]


# the target run first (a check cut short keeps it): 8B upper half, resident, seq 4096
GPU_RUNS = _trio("llama-3.1-8b", "16-31") + _trio("llama-3.1-8b", "14-17") + _trio("llama-3.2-1b", "8-15")
SMOKE_RUNS = [SpeedRun("tiny", "2,3", 3, "resident"), SpeedRun("tiny", "2,3", 2)]


def write_random_corpus(out: Path, tokens: int, seed: int = 0) -> Path:
    """A prepared dir (npt_ds/data/prepared.py's format) of random byte-tokenizer ids: the runs' data."""
    tokenizer = ByteTokenizer()
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    ids = np.random.default_rng(seed).integers(0, 256, size=tokens).astype(dtype)
    np.save(out / "shard-00000.npy", ids)
    index = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_name(tokenizer), "tokenizer_arg": "bytes",
             "vocab_hash": vocab_hash(tokenizer), "eos_id": tokenizer.eos_token_id, "dtype": dtype.name,
             "source": ["random"], "split": "train", "documents": 1, "tokens": tokens,
             "shards": [{"file": "shard-00000.npy", "tokens": tokens, "documents": 1}]}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    return out


def recipe_for(run: SpeedRun, work: Path, corpus: Path, seq: int, steps: int, opts) -> Path:
    tiny = run.shape == "tiny"
    extra = {"model": {"path": run.shape, "dtype": "float32" if tiny else "bfloat16"},
             "npt": {"layers": run.layers, "rank": 8 if tiny else 64, "num_ranks": 1},
             "data": {"source": "prepared", "path": str(corpus), "eval_path": str(corpus), "seq_len": seq,
                      "eval_seq_len": seq, "eval_batches": 1, "micro_batch_size": 1},
             "deepspeed": {"precision": opts.precision, "zero_stage": run.stage, "frozen_base": run.frozen_base},
             "logging": {"run_dir": str(work / f"run-{run.name}"), "log_every": 1, "eval_every": 0,
                         "console": False}}
    return write_recipe(work, run.name, run.stage, TEMPLATES[run.stage], opts, model=run.shape, layers=run.layers,
                        steps=steps, frozen_base=run.frozen_base, extra=extra)


def planner_prediction(recipe: Path, gpu_mem_gib: float, peak: float | None) -> dict:
    """What `npt-ds plan RECIPE --gpu-mem G --peak-tflops P` predicts for this run on one GPU."""
    inputs = inputs_from_config(load_config(str(recipe), []), nodes=1, gpus_per_node=1, gpu_mem_gib=gpu_mem_gib)
    plan = plan_memory(inputs)
    mode = inputs.frozen_base if inputs.zero_stage == 3 else "resident"  # ZeRO-2 holds the base like resident
    row = next(r for r in predict(inputs, peak_tflops=peak or DEFAULT_PEAK_TFLOPS, mfu=DEFAULT_MFU)
               if r["mode"] == mode)
    return {"mem_bytes": plan.total, "fits": plan.fits, "step_s": row["step_s"], "compute_s": row["compute_s"],
            "tokens_per_s": row["tokens_per_s_per_gpu"],
            "comm_s": row["comm_s"], "flops": row["flops"], "mfu_assumed": DEFAULT_MFU,
            "peak_tflops": peak or DEFAULT_PEAK_TFLOPS}


def summarize_metrics(path: Path, warmup: int) -> dict:
    """Medians over the steady train lines of rank 0's metric stream (after `warmup` steps)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    train = [r for r in rows if r.get("event") == "train"]
    steady = [r for r in train if r["step"] > warmup] or train[-1:]

    def med(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    out = {"train_lines": len(train), "steady_lines": len(steady),
           "step_s": med("time/step_s"), "tokens_per_s": med("tokens_per_s"), "mfu": med("perf/mfu"),
           "tflops_per_device": med("perf/tflops_per_device"), "own_step_s": med("rank/0/step_s"),
           "peak_mem_gb": max((r.get("mem/peak_alloc_gb", 0.0) for r in steady), default=None),
           "reserved_gb": max((r.get("mem/reserved_gb", 0.0) for r in steady), default=None),
           "gather_gb_per_step": med("comm/gather_gb_per_step"), "reduce_gb_per_step": med("comm/reduce_gb_per_step"),
           "loss_first": train[0].get("loss/total") if train else None,
           "loss_last": train[-1].get("loss/total") if train else None,
           "clock_wall_s": med("clock/wall_s"), "clock_host_own_s": med("clock/host_own_s"),
           "clock_stream_own_s": med("clock/stream_own_s")}
    ratios = [r["clock/stream_own_s"] / r["clock/host_own_s"] for r in steady
              if r.get("clock/stream_own_s") and r.get("clock/host_own_s")]
    out["clock_stream_over_host"] = statistics.median(ratios) if ratios else None
    return out


def run_one(run: SpeedRun, work: Path, corpus: Path, opts) -> dict:
    recipe = recipe_for(run, work, corpus, opts.speed_seq, opts.speed_steps, opts)
    cmd = launch_cmd(1, "bench.dist_worker", recipe, ["--patch", "shape_model,clock_check"])
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(1, opts.threads), text=True, capture_output=True,
                              timeout=opts.speed_timeout)
        rc, log = proc.returncode, proc.stdout + "\n" + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, log = 124, f"timed out after {opts.speed_timeout} s\n{exc.stdout or ''}\n{exc.stderr or ''}"
    (work / f"{run.name}.log").write_text(log if isinstance(log, str) else str(log))
    res = {"run": run.name, "shape": run.shape, "npt_layers": run.layers, "zero_stage": run.stage,
           "frozen_base": run.frozen_base if run.stage == 3 else None, "seq": opts.speed_seq,
           "steps": opts.speed_steps, "warmup": opts.speed_warmup, "rc": rc, "wall_s": round(time.time() - t0, 1),
           "tokens_per_step": opts.speed_seq}
    res.update(summarize_metrics(work / f"run-{run.name}" / "metrics.jsonl", opts.speed_warmup))
    if rc != 0:
        res["error_tail"] = log[-2000:]
    try:
        plan = planner_prediction(recipe, opts.gpu_mem_gib, opts.peak_tflops)
    except Exception as exc:  # noqa: BLE001 - the measurement stands without a prediction
        plan = {"error": f"{type(exc).__name__}: {exc}"}
    res["planner"] = plan
    if opts.device == "cuda":  # a CPU's step and RSS are not what the planner models
        if res.get("step_s") and plan.get("step_s"):
            res["step_over_planner"] = res["step_s"] / plan["step_s"]
        if res.get("peak_mem_gb") and plan.get("mem_bytes"):
            res["mem_over_planner"] = res["peak_mem_gb"] * 1e9 / plan["mem_bytes"]
        if res.get("tokens_per_s") and plan.get("tokens_per_s"):
            res["tokens_over_planner"] = res["tokens_per_s"] / plan["tokens_per_s"]
        if res.get("mfu") and plan.get("mfu_assumed"):
            res["mfu_over_planner"] = res["mfu"] / plan["mfu_assumed"]
    return res


def zero3_over_zero2(runs: list[dict]) -> dict[str, float]:
    """tokens/s of ZeRO-3 resident ÷ ZeRO-2 for each shape and layer set measured both ways."""
    by = {(r["shape"], r["npt_layers"], r["zero_stage"], r["frozen_base"]): r for r in runs}
    out = {}
    for (shape, layers, stage, mode), r in by.items():
        z2 = by.get((shape, layers, 2, None))
        if stage == 3 and mode == "resident" and z2 and r.get("tokens_per_s") and z2.get("tokens_per_s"):
            out[f"{shape} {layers}"] = r["tokens_per_s"] / z2["tokens_per_s"]
    return out
