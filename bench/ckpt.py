"""Checkpoint benchmark: each rank's peak host memory and the time of a save and a load, and SIGTERM -> saved -> exit
at 8B scale.

* ``save`` / ``load`` -- the demo recipe (4 NPT layers, 1.08 M trainable) and the same with 10x its trainable
  parameters (layers 14-29, rank 160: 10.8 M), on 1 and 2 ranks (ZeRO-3, `frozen_base: auto`): the trainer's own
  `save()` after one step, then `load_checkpoint` of the 2-rank save on 2 ranks (DeepSpeed's shards) and on 1 rank
  (the sharded portable state, resharded), and of the 1-rank save on 2 ranks.  Per rank: RSS before, the peak
  while it ran (the kernel's high-water mark, bench/ckpt_worker.py), seconds.
* ``preempt`` -- Llama-3.1-8B's shape with its upper half (layers 16-31) converted at the 8B recipe's rank 256, k 4,
  dual (configs/llama3_8b_upper_half.yaml: 0.55 B trainable, 6.6 GB of fp32 master + Adam) on 2 ranks, bf16
  ZeRO-3.  Built from what a checkpoint holds: the NP components only (the frozen base is never saved, so its
  weights do not change what is measured).  Adam's state is made, then SIGTERM: the trainer's checkpoint save and
  the process's exit, timed from the signal (target < 30 s: DeepSpeed's launcher SIGKILLs a rank 30 s after
  forwarding a SIGTERM).  The step in flight when a real signal comes is not included.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from .common import REPO_ROOT, format_table, target
from .dist import launch_cmd, run_env

DEMO = str(REPO_ROOT / "configs" / "smollm2_demo.yaml")
CONFIGS = {"demo": [], "demo_x10": ["npt.layers=14-29", "npt.rank=160"]}


def worker(ranks: int, out: Path, *args: str, timeout: float = 900) -> tuple[list[dict], float]:
    """Launch bench.ckpt_worker on `ranks` ranks; -> (each rank's JSON, wall seconds of the launch)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_cmd(ranks, "bench.ckpt_worker", Path(DEMO), ["--out", str(out), *args])
    env = run_env(ranks)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    phase = args[args.index("--phase") + 1]
    files = sorted(out.glob(f"{phase}-rank*.json"))
    if proc.returncode or len(files) != ranks:
        raise RuntimeError(f"ckpt worker ({phase}, {ranks} ranks) failed: rc {proc.returncode}\n{proc.stderr[-3000:]}")
    return [json.loads(f.read_text()) for f in files], wall


def summary(rows: list[dict], key: str = "seconds") -> dict:
    return {"ranks": len(rows), key: max(r[key] for r in rows),
            "rss_before_gb": max(r["rss_before_gb"] for r in rows), "rss_peak_gb": max(r["rss_peak_gb"] for r in rows),
            "rss_increase_gb": round(max(r["rss_peak_gb"] - r["rss_before_gb"] for r in rows), 3),
            "trainable_params": rows[0]["trainable_params"], "per_rank": rows}


def run_ckpt(opts) -> dict:
    res: dict = {"save": {}, "load": {}}
    with tempfile.TemporaryDirectory(prefix="npt-bench-ckpt-") as tmp:
        root = Path(tmp)
        for name, sets in CONFIGS.items():
            saved = {}
            for ranks in (1, 2):
                rows, _ = worker(ranks, root / f"{name}-save{ranks}", "--phase", "save", "--set", *sets)
                res["save"][f"{name}_{ranks}r"] = summary(rows)
                saved[ranks] = rows[0]["path"]
            for src, ranks in ((2, 2), (2, 1), (1, 2)):
                rows, _ = worker(ranks, root / f"{name}-load{src}to{ranks}", "--phase", "load", "--target",
                                 saved[src], "--set", *sets)
                res["load"][f"{name}_{src}r_to_{ranks}r"] = {**summary(rows), "kind": rows[0]["kind"]}
        out = root / "preempt"
        rows, _ = worker(2, out, "--phase", "preempt", "--shape", "llama-3.1-8b", "--layers", "16-31",
                         "--rank-np", "256", "--k", "4", "--dual", timeout=1800)
        signalled = json.loads((out / "signal.json").read_text())
        ended = max((out / f"preempt-rank{r}.json").stat().st_mtime for r in range(2))
        res["preempt"] = {"trainable_params": signalled["trainable_params"], "save_s": max(r["save_s"] for r in rows),
                          "signal_to_exit_s": round(time.time() - signalled["time"], 1),
                          "signal_to_saved_s": round(ended - signalled["time"], 2),
                          "bytes_on_disk": rows[0]["bytes_on_disk"]}
    res["targets"] = ckpt_targets(res)
    return res


def state_share_gb(run: dict) -> float:
    """The fp32 master + both Adam moments of one rank's share of the trainable parameters, GB."""
    return 12 * run["trainable_params"] / run["ranks"] / 1e9


def ckpt_targets(res: dict) -> dict:
    """The preemption bound, and each rank's peak RSS increase in units of its own share of the trainable state (the
    10x config: the demo's increases are a few MB, below the sampler's noise).  A load's increase includes the Adam
    moments it creates (DeepSpeed makes them at the first step), so a bounded load reads about 1-2 shares."""
    pre, x10_saves = res["preempt"], [v for k, v in res["save"].items() if k.startswith("demo_x10")]
    x10_loads = [v for k, v in res["load"].items() if k.startswith("demo_x10")]
    return {
        "preempt_8b_signal_to_exit_s": target(pre["signal_to_exit_s"], 30.0, "<=",
                                              "8B upper half (0.55 B trainable), 2 ranks: SIGTERM -> saved -> exit, s"),
        "save_rss_over_state_share": target(round(max(v["rss_increase_gb"] / state_share_gb(v) for v in x10_saves), 3),
                                            0.5, "<=", "10x config, 1 and 2 ranks: the save's peak RSS increase "
                                            "per rank / that rank's fp32 master + Adam share (a copy of the whole "
                                            "state on every rank, as before, is `world` shares)"),
        "load_rss_over_state_share": target(round(max(v["rss_increase_gb"] / state_share_gb(v) for v in x10_loads), 3),
                                            None, "<=", "10x config, native and resharded loads: the same for a load"),
    }


def print_ckpt(res: dict) -> str:
    rows = [{"run": f"save {k}", "params": v["trainable_params"], "s": v["seconds"], "before": v["rss_before_gb"],
             "peak": v["rss_peak_gb"], "inc": v["rss_increase_gb"]} for k, v in res["save"].items()]
    rows += [{"run": f"load {k} ({v['kind']})", "params": v["trainable_params"], "s": v["seconds"],
              "before": v["rss_before_gb"], "peak": v["rss_peak_gb"], "inc": v["rss_increase_gb"]}
             for k, v in res["load"].items()]
    pre = res["preempt"]
    table = format_table(rows, [("run", "run", ""), ("trainable", "params", ","), ("seconds", "s", ".3f"),
                                ("RSS before GB", "before", ".3f"), ("peak GB", "peak", ".3f"),
                                ("increase GB", "inc", ".3f")], title="checkpoint (per rank: the max over ranks)")
    return (table + f"\n8B upper half, {pre['trainable_params']:,} trainable, 2 ranks: save {pre['save_s']} s, "
            f"SIGTERM -> saved {pre['signal_to_saved_s']} s -> exit {pre['signal_to_exit_s']} s, "
            f"{pre['bytes_on_disk'] / 1e9:.2f} GB on disk")
