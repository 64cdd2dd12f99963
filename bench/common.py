"""Shared benchmark helpers: threads, interleaved timing, memory probes, FLOP counting, output.

Timing: every variant of one comparison runs in the same process, interleaved round by round
(the order rotates each round), after warm-up.  One sample of a variant in a round is the best of
`best_of` back-to-back calls: on a shared 2-core machine, bursts of load from other processes hit
single calls (a 0.7 s step then takes 4 s), and the best of two or three filters most of them.
We report the median (and min) over rounds and, for ratios, the median of per-round paired ratios
(primary), the ratio of medians and the ratio of minima.

Memory on CPU (no CUDA allocator statistics to read):
* ``alloc_peak_mb`` -- peak bytes held by torch tensors during one call, rebuilt from the torch
  profiler's allocator events (``profile_memory=True``): the analogue of
  ``torch.cuda.max_memory_allocated``.  Deterministic, per variant, in-process.
* ``peak_rss_mb`` / ``rss_delta_mb`` -- the process high-water mark (``VmHWM``) after resetting it
  through ``/proc/self/clear_refs`` ("5"), measured in a fresh subprocess per variant after one
  warm-up step (glibc keeps freed pages, so in-process RSS deltas between variants would be
  meaningless; the probe also pins glibc's mmap threshold so freed tensors leave RSS at once).
  Falls back to ``resource.getrusage`` max RSS (not resettable) when ``clear_refs`` is unavailable.
On CUDA ``torch.cuda.max_memory_allocated`` is used instead.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- setup
def set_threads(n: int) -> None:
    """Pin torch's intra-op pool (and OMP/MKL for child processes) to n threads."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def resolve_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[name]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def env_info(device: str = "cpu") -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "device": device,
            "loadavg_at_start": list(os.getloadavg())}
    try:
        import deepspeed
        import transformers

        info["deepspeed"], info["transformers"] = deepspeed.__version__, transformers.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_rev"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                                         capture_output=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1,
                device: str = "cpu", best_of: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` rounds, variants interleaved in rotating order.

    A sample is the best (min) of `best_of` timings, each the mean over `inner` back-to-back calls.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            best = float("inf")
            for _ in range(best_of):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[name]()
                sync(device)
                best = min(best, (time.perf_counter() - t0) / inner)
            times[name].append(best)
    return times


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median_s": statistics.median(s), "min_s": s[0], "p25_s": q(0.25), "p75_s": q(0.75), "n": len(s)}


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict:
    """time(num)/time(den): ratio of medians, median of per-round ratios, ratio of minima."""
    paired = [a / b for a, b in zip(times[num], times[den])]
    return {"of_medians": statistics.median(times[num]) / statistics.median(times[den]),
            "paired_median": statistics.median(paired),
            "of_minima": min(times[num]) / min(times[den])}


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: lifetime max RSS (kB on Linux, bytes on macOS)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kb / 1024


def alloc_peak_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak tensor bytes (MB) held during fn() beyond what was live before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations/frees are attributed to the op that made them (self memory); frees outside any
    # op show up as "[memory]" events.  Replaying them in time order gives the live-bytes curve.
    items = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                   for e in prof.events())
    cur = peak = 0
    for _, delta in items:
        cur += delta
        peak = max(peak, cur)
    return peak / 2**20


# ----------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_flops(query_shape, key_shape, value_shape) -> int:
    b, h, tq, d = query_shape
    tk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * tq * tk * d + 2 * b * h * tq * tk * dv


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one fn() call (matmuls + attention), via torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:  # CPU SDPA is not in torch's registry; count it like the CUDA kernels
        def sdpa_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return _sdpa_cpu_flops(query_shape, key_shape, value_shape)

        custom[fwd] = sdpa_fwd
    if bwd is not None:
        def sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)

        custom[bwd] = sdpa_bwd
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- subprocess probes
def run_probe(args: list[str], timeout: float = 600) -> dict:
    """Run `python -m bench.probe ARGS` in a fresh process; its last stdout line is JSON."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors leave RSS at once (see probe.py)
    proc = subprocess.run([sys.executable, "-m", "bench.probe", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"probe {' '.join(args)} failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- output
def write_results(name: str, data: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str = "") -> str:
    """columns: (header, key, format spec).  Missing values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            v = row.get(key)
            if v is None or (isinstance(v, float) and v != v):
                line.append("-")
            else:
                line.append(format(v, fmt) if fmt else str(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = [title] if title else []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if j and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def target(value: float | None, threshold: float | None, op: str, description: str) -> dict:
    """A target check; threshold None = a value that is reported, not judged."""
    if value is None or threshold is None:
        met = None
    else:
        met = value <= threshold if op == "<=" else value >= threshold
    return {"description": description, "value": value, "threshold": threshold, "op": op, "met": met}
