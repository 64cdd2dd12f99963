"""Benchmark npt-monitor: big-file open time and responsiveness while tailing.

    PYTHONPATH=. .venv/bin/python bench/monitor_bench.py [--lines 100000] [--rate 50] [--seconds 5] [--out F]
    PYTHONPATH=. .venv/bin/python bench/monitor_bench.py --baseline $(git merge-base HEAD main) [--load-only]

(a) generates a ``--lines`` metric file (synthetic converging run, 4 NPT
    layers logged every step, an eval line every 500 steps) and measures
    - ``model_load_s`` (and CPU seconds ``model_load_cpu_s``): parse + fold the
      whole file into the model, alerts included (no UI), the median of
      ``--load-repeats`` fresh interpreters (``model_load_runs_s``: each one);
      with ``--baseline REV`` the same load of ``npt_monitor`` as it was at git
      revision REV (exported with ``git archive`` into a temporary directory)
      runs too, alternating with the current tree in fresh interpreters
      (current, baseline, baseline, current, ...: a drift of the machine's
      speed cancels): ``baseline_model_load_s`` (median), ``load_ratio`` =
      current / baseline, ``load_target_met`` (< 2 s and ratio <= 1.1);
      ``--load-only`` stops after the load,
    - in ``App.run_test()``: ``first_render_s`` (first data on screen) and
      ``full_load_s`` (last step shown, plots drawn) counted from app start.
(b) while a writer thread appends ``--rate`` lines/s for ``--seconds`` s to that
    same (already loaded) file, it measures
    - ``apply_ms``: handling of each tail update (fold + alerts) on the UI thread,
    - ``refresh_ms``: pushing the model into the widgets, ``plot_render_ms``,
    - ``line_to_screen_ms``: from a line being written to its step in the header,
    - ``key_to_action_ms``: a key press (``z``, zoom) until its action runs,
    - ``key_to_screen_idle_ms``: ``pilot.press("z")`` until the screen is idle
      again (includes re-rendering both plots at the new zoom),
    - ``loop_lag_ms``: event-loop lag seen by a 10 ms ticker (UI stalls);
      ``load_loop_lag_ms`` is the same while the 100k lines are loading.
(c) ``cost``: the monitor's own CPU use, the app running headless in a
    subprocess (``App.run(headless=True)``) on a metrics file, CPU time read from
    ``/proc/PID/stat``:
    - ``idle_cpu_pct``: % of one core over ``--cost-seconds`` with no new lines,
    - ``tail_cpu_pct``: the same while ``--tail-rate`` lines/s are appended
      (a real run's log_every=1 writes a few lines/s),
    - ``train``: the tiny recipe (``configs/tiny_debug.yaml``, 2 ranks,
      ``--train-steps``, 400) trained twice, alone and watched by the monitor
      (started 8 s before the run: its start-up is not the cost of watching);
      in the order without, with, with, without (a drift of the machine's speed
      cancels); ``tokens_per_s_without`` / ``_with`` are the medians of the train
      lines' ``tokens_per_s`` after the first 5 steps of both runs, ``ratio`` =
      with / without (target >= 0.97).  ``--no-train`` skips it.
Prints one JSON object.  Wall-clock numbers depend on machine load, so the
load average and the process CPU time are reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npt_monitor.app import MonitorApp, make_app  # noqa: E402
from npt_monitor.run import Run  # noqa: E402
from npt_monitor.synth import synth_records  # noqa: E402
from npt_monitor.widgets import MetricPlot, RunHeader, RunView  # noqa: E402


def stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {
        "n": len(xs),
        "median": round(statistics.median(xs), 2),
        "p95": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 2),
        "max": round(xs[-1], 2),
    }


def generate(path: Path, n: int) -> tuple[list[str], int]:
    """Write the first ``n`` steps; return the lines for the tail phase too."""
    gen = synth_records(n + 2000, total_steps=n + 2000, n_layers=4, eval_every=500)
    with open(path, "w") as fh:
        count = 0
        for rec in gen:
            fh.write(json.dumps(rec) + "\n")
            count += 1
            if rec.get("step") == n and rec.get("event") == "train":
                break
        rest = [json.dumps(r) for r in gen]
    return rest, count


# the model load as `npt-monitor --check` does it (imports not timed), in a fresh interpreter, importing
# npt_monitor from argv[2]
MODEL_LOAD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import npt_monitor
from npt_monitor.parsing import parse_lines
from npt_monitor.run import Run
from npt_monitor.tailer import FileTailer
path = Path(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()  # after the imports: parse, fold and alerts only
run = Run(path)
tailer = FileTailer(path, read_size=1 << 20)
while (chunk := tailer.poll()) is not None:
    batch, corrupt = parse_lines(chunk.lines, chunk.first_line_no)
    run.ingest(batch, corrupt)
tailer.close()
print(json.dumps([time.perf_counter() - t0, time.process_time() - c0, run.state.n_records, npt_monitor.__file__]))
"""
REPO = Path(__file__).resolve().parents[1]
LOAD_TARGET_S, LOAD_RATIO_TARGET = 2.0, 1.1


def load_once(path: Path, tree: Path) -> list:
    """[wall s, CPU s, records, the npt_monitor/__init__.py it loaded] of one model load of `path` in a fresh
    interpreter that imports npt_monitor from `tree` (its cwd and PYTHONPATH, so no other copy can shadow it)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", MODEL_LOAD, str(path), str(tree)], cwd=tree, env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout)


def model_load_fresh(path: Path, repeats: int) -> dict:
    """The model load in ``repeats`` fresh interpreters, as ``npt-monitor`` opens a file: the median and
    every run (this 2-core VM's speed drifts by up to 1.5x between minutes, so one figure says little)."""
    runs = [load_once(path, REPO) for _ in range(repeats)]
    wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
    return {"model_load_s": round(statistics.median(wall), 3), "model_load_cpu_s": round(statistics.median(cpu), 3),
            "model_load_runs_s": [round(w, 3) for w in wall], "model_records": runs[0][2]}


def fail(message: str) -> None:
    print(f"monitor_bench: {message}", file=sys.stderr)
    raise SystemExit(2)


def export_tree(rev: str, into: Path) -> str:
    """``npt_monitor`` as it is at git revision `rev`, extracted under `into`; returns the commit hash."""
    import subprocess
    import tarfile

    def git(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False, **kw)

    found = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", text=True)
    if found.returncode:
        fail(f"--baseline {rev}: not a commit of {REPO} (try $(git merge-base HEAD main))")
    commit = found.stdout.strip()
    tar = git("archive", "--format=tar", commit, "npt_monitor")
    if tar.returncode:
        fail(f"--baseline {rev}: git archive failed: {tar.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(into, filter="data")
    return commit


def model_load_side_by_side(path: Path, repeats: int, rev: str) -> dict:
    """The model load of the current tree and of `rev`'s, alternating in fresh interpreters (ABBA order)."""
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_tree(rev, Path(tmp))
        trees = {"current": REPO, "baseline": Path(tmp)}
        runs: dict[str, list] = {"current": [], "baseline": []}
        for i in range(max(1, repeats)):
            for name in (("current", "baseline") if i % 2 == 0 else ("baseline", "current")):
                runs[name].append(load_once(path, trees[name]))
    median = {name: statistics.median(r[0] for r in got) for name, got in runs.items()}
    if runs["current"][0][2] != runs["baseline"][0][2]:
        fail(f"the two trees read {runs['current'][0][2]} and {runs['baseline'][0][2]} records of the same file")
    ratio = median["current"] / median["baseline"]
    return {
        "model_load_s": round(median["current"], 3),
        "model_load_cpu_s": round(statistics.median(r[1] for r in runs["current"]), 3),
        "model_load_runs_s": [round(r[0], 3) for r in runs["current"]],
        "model_records": runs["current"][0][2],
        "baseline_rev": commit,
        "baseline_model_load_s": round(median["baseline"], 3),
        "baseline_model_load_cpu_s": round(statistics.median(r[1] for r in runs["baseline"]), 3),
        "baseline_model_load_runs_s": [round(r[0], 3) for r in runs["baseline"]],
        "load_order": "current, baseline, baseline, current, ... (fresh interpreters)",
        "load_ratio": round(ratio, 3),
        "load_target_met": median["current"] < LOAD_TARGET_S and ratio <= LOAD_RATIO_TARGET,
        "load_modules": {name: got[0][3] for name, got in runs.items()},
    }


def timed(cls, name: str, sink: list[float]) -> None:
    """Patch ``cls.name`` so every call's duration (ms) lands in ``sink``."""
    fn = getattr(cls, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            sink.append(1000 * (time.perf_counter() - t))

    setattr(cls, name, wrapper)


async def bench_app(path: Path, n_steps: int, rest: list[str], rate: float, seconds: float, size) -> dict:
    out: dict = {}
    apply_ms: list[float] = []
    refresh_ms: list[float] = []
    plot_ms: list[float] = []
    key_idle_ms: list[float] = []
    key_action_ms: list[float] = []
    line_ms: list[float] = []
    lag = {"load": [], "tail": []}
    phase = ["load"]
    timed(MetricPlot, "_build", plot_ms)
    timed(Run, "apply", apply_ms)
    timed(RunView, "refresh_view", refresh_ms)
    pressed_at = [0.0]
    action_zoom = MonitorApp.action_zoom

    def probe_zoom(self):
        key_action_ms.append(1000 * (time.perf_counter() - pressed_at[0]))
        return action_zoom(self)

    MonitorApp.action_zoom = probe_zoom
    stop = threading.Event()

    async def ticker() -> None:  # event-loop lag seen by a 10 ms timer = UI stall
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lag[phase[0]].append(max(0.0, 1000 * (time.perf_counter() - t - 0.01)))

    t_start = time.perf_counter()
    c_start = time.process_time()
    app = make_app([path])
    async with app.run_test(size=size) as pilot:
        t_enter = time.perf_counter()
        tick = asyncio.ensure_future(ticker())
        view = app.query_one(RunView)
        header = view.query_one(RunHeader)
        plots = list(view.query(MetricPlot))
        first = None
        give_up = time.perf_counter() + 120
        while time.perf_counter() < give_up:
            if first is None and header.info.step is not None:
                first = time.perf_counter()
            if header.info.step == n_steps and all(p.version == view.run.state.version for p in plots):
                break
            await asyncio.sleep(0.005)
        await pilot.pause()
        t_full = time.perf_counter()
        out["full_load_cpu_s"] = round(time.process_time() - c_start, 3)
        out["app_start_s"] = round(t_enter - t_start, 3)
        out["first_render_s"] = round((first or t_full) - t_start, 3)
        out["full_load_s"] = round(t_full - t_start, 3)
        out["load_batches"] = view.n_batches
        out["load_apply_ms"] = stats(apply_ms)
        out["load_plot_render_ms"] = stats(plot_ms)
        out["load_loop_lag_ms"] = stats(lag["load"])
        for sink in (plot_ms, apply_ms, refresh_ms):
            sink.clear()
        phase[0] = "tail"

        written: dict[int, float] = {}

        def writer() -> None:
            interval = 1.0 / rate
            t_next = time.perf_counter()
            with open(path, "a") as fh:
                for line in rest:
                    if stop.is_set() or time.perf_counter() - t_w0 > seconds:
                        break
                    fh.write(line + "\n")
                    fh.flush()
                    rec = json.loads(line)
                    if rec.get("event") == "train":
                        written[rec["step"]] = time.perf_counter()
                    t_next += interval
                    time.sleep(max(0.0, t_next - time.perf_counter()))

        t_w0 = time.perf_counter()
        wt = threading.Thread(target=writer, daemon=True)
        wt.start()
        last_seen = header.info.step
        next_key = time.perf_counter() + 0.25
        while wt.is_alive() or time.perf_counter() - t_w0 < seconds + 1.0:
            step = header.info.step
            if step != last_seen and step in written:
                line_ms.append(1000 * (time.perf_counter() - written[step]))
                last_seen = step
            if time.perf_counter() >= next_key:
                before = app.zoom
                pressed_at[0] = t = time.perf_counter()
                await pilot.press("z")  # zoom: changes the x range, so both plots re-render
                key_idle_ms.append(1000 * (time.perf_counter() - t))
                assert app.zoom != before
                next_key = time.perf_counter() + 0.25
            await asyncio.sleep(0.005)
            if time.perf_counter() - t_w0 > seconds + 5:
                break
        stop.set()
        await tick
        wt.join(2)
        out["tail"] = {
            "lines_written": len(written),
            "seconds": seconds,
            "rate_lines_per_s": rate,
            "final_step_shown": header.info.step,
            "apply_ms": stats(apply_ms),
            "refresh_ms": stats(refresh_ms),
            "plot_render_ms": stats(plot_ms),
            "line_to_screen_ms": stats(line_ms),
            "key_to_action_ms": stats(key_action_ms),
            "key_to_screen_idle_ms": stats(key_idle_ms),
            "loop_lag_ms": stats(lag["tail"]),
        }
    MonitorApp.action_zoom = action_zoom
    return out


HEADLESS_APP = (
    "import sys; from npt_monitor.app import make_app; "
    "make_app([sys.argv[1]], poll_interval=0.2).run(headless=True, size=(160, 48))"
)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (and its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def start_monitor(path: Path):
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", HEADLESS_APP, str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_pct(pid: int, seconds: float) -> float:
    c0, t0 = proc_cpu_s(pid), time.perf_counter()
    time.sleep(seconds)
    return round(100 * (proc_cpu_s(pid) - c0) / (time.perf_counter() - t0), 2)


def monitor_cpu(path: Path, rest: list[str], seconds: float, rate: float) -> dict:
    """Idle and tailing CPU % of the headless monitor on `path` (already written)."""
    proc = start_monitor(path)
    try:
        time.sleep(max(3.0, seconds / 2))  # start-up and the first full load are not idle time
        idle = cpu_pct(proc.pid, seconds)
        stop = threading.Event()

        def writer() -> None:
            with path.open("a") as f:
                for line in rest:
                    if stop.is_set():
                        return
                    f.write(line + "\n")
                    f.flush()
                    time.sleep(1.0 / rate)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        tail = cpu_pct(proc.pid, seconds)
        stop.set()
        thread.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"idle_cpu_pct": idle, "tail_cpu_pct": tail, "tail_rate_lines_per_s": rate, "seconds": seconds}


def train_tokens_per_s(run_dir: Path, steps: int, watch: bool) -> list[float]:
    """tokens/s of each step of a tiny 2-rank run (after its first 5), optionally watched by the monitor."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NUM_RANKS": "2",
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(repo)}
    cmd = ["bash", str(repo / "launch" / "train_local.sh"), "configs/tiny_debug.yaml", f"logging.run_dir={run_dir}",
           f"schedule.total_steps={steps}", "checkpoint.every=0", "checkpoint.save_final=false", "logging.log_every=1"]
    monitor = None
    if watch:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").touch()
        monitor = start_monitor(run_dir / "metrics.jsonl")
        time.sleep(8.0)  # its start-up (imports, first render) is not what watching a run costs
    try:
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if monitor is not None:
            monitor.terminate()
            monitor.wait(timeout=30)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["tokens_per_s"] for r in rows if r.get("event") == "train" and r["step"] > 5]


def cost(path: Path, rest: list[str], args) -> dict:
    out = monitor_cpu(path, rest, args.cost_seconds, args.tail_rate)
    if not args.no_train:
        rates: dict[bool, list[float]] = {False: [], True: []}
        with tempfile.TemporaryDirectory() as tmp:
            for k, watch in enumerate((False, True, True, False)):  # ABBA: a drift of the VM's speed cancels
                rates[watch] += train_tokens_per_s(Path(tmp) / f"run{k}", args.train_steps, watch=watch)
        without, with_ = statistics.median(rates[False]), statistics.median(rates[True])
        out["train"] = {"recipe": "configs/tiny_debug.yaml", "ranks": 2, "steps": args.train_steps,
                        "order": "without, with, with, without", "tokens_per_s_without": round(without, 1),
                        "tokens_per_s_with": round(with_, 1), "ratio": round(with_ / without, 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", default="160x48", help="terminal WxH for run_test")
    ap.add_argument("--out", default=None, help="also write the JSON summary to this file")
    ap.add_argument("--cost-seconds", type=float, default=10.0, help="CPU sampling time, idle and tailing")
    ap.add_argument("--tail-rate", type=float, default=5.0, help="lines/s appended while measuring tailing CPU")
    ap.add_argument("--load-repeats", type=int, default=5, help="fresh-process model loads (median reported)")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="also load with npt_monitor as of git revision REV, alternating (e.g. $(git merge-base HEAD main))")
    ap.add_argument("--load-only", action="store_true", help="only the model load (with --baseline: of both trees)")
    ap.add_argument("--train-steps", type=int, default=400, help="steps of each tiny training run")
    ap.add_argument("--no-train", action="store_true", help="skip the tokens/s with/without the monitor")
    ap.add_argument("--cost-only", action="store_true", help="only (c): the monitor's CPU cost")
    args = ap.parse_args(argv)
    size = tuple(int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        t = time.perf_counter()
        rest, n_lines = generate(path, args.lines)
        result: dict = {
            "file_lines": n_lines,
            "file_mb": round(os.path.getsize(path) / 1e6, 1),
            "generate_s": round(time.perf_counter() - t, 2),
            "cpu_count": os.cpu_count(),
        }
        result["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
        if not args.cost_only:
            result.update(model_load_side_by_side(path, args.load_repeats, args.baseline) if args.baseline
                          else model_load_fresh(path, args.load_repeats))
        if not (args.cost_only or args.load_only):
            result["app"] = asyncio.run(bench_app(path, args.lines, rest, args.rate, args.seconds, size))
        if not args.load_only:
            result["cost"] = cost(path, rest, args)
        result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
