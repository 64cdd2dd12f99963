"""`npt-ds sweep SWEEP.yaml`: one base recipe, a list/grid of `key.path=value` overrides, seeds; one table.

Sweep file::

    base: configs/smollm2_demo.yaml      # the recipe every run starts from
    sweep_dir: runs/sweeps/demo          # SWEEP_DIR/<variant>/seed-<s>/ per run; results.{json,md} here
    num_ranks: 1                         # NUM_RANKS for launch/train_local.sh (default 1)
    seeds: [0, 1]
    set: [schedule.total_steps=120]      # overrides for every run
    variants:
      - {name: baseline}
      - {name: normalised-mse, set: [loss.layerwise_scaling=true]}
      - grid: {npt.rank: [32, 64, 128], npt.num_ranks: [1, 4]}   # one variant per combination
        prefix: rank                                              # names rank-rank=32-num_ranks=1 ...
      - {name: dual, set: [npt.dual=true], seeds: [0, 1, 2]}     # this variant's own seeds (confirmation runs)
      - grid: {schedule.total_steps: [240, 480, 960]}             # a budget curve: variants of one family
        family: demo-recipe                                       # are drawn as NPT/base ratio vs tokens

Runs go one after another, every variant's first seed before any variant's second (screen, then confirm),
through `launch/train_local.sh` (the launcher `train` uses) with
`checkpoint.resume=auto`, so a re-run of the sweep skips runs whose final eval (step == total_steps) is in
their metrics.jsonl and continues half-done ones from their last checkpoint.  A run that exits non-zero is a
row with its error (the last meaningful stderr line); the sweep goes on.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, load_config
from .sweep_report import collect, final_eval, write_reports

REPO = Path(__file__).resolve().parents[2]
SWEEP_KEYS = ("base", "sweep_dir", "num_ranks", "seeds", "set", "variants", "grid")


@dataclass
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | None = None  # None: the sweep's seeds
    family: str | None = None  # variants of one family form one ratio-vs-tokens curve in the report


@dataclass
class Sweep:
    base: str
    sweep_dir: Path
    num_ranks: int
    seeds: list[int]
    common: list[str]
    variants: list[Variant]

    def seeds_of(self, variant: Variant) -> list[int]:
        return self.seeds if variant.seeds is None else variant.seeds

    def runs(self) -> list[tuple[Variant, int]]:
        """Every (variant, seed) in the order they run: each variant's first seed, then each one's second, ...
        (a sweep stopped half-way has screened every variant once before it confirms any)."""
        depth = max(len(self.seeds_of(v)) for v in self.variants)
        return [(v, self.seeds_of(v)[k]) for k in range(depth) for v in self.variants if k < len(self.seeds_of(v))]

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return self.sweep_dir / variant.name / f"seed-{seed}"

    def overrides(self, variant: Variant, seed: int) -> list[str]:
        """What `train` gets for one run: common, the variant's, then the run's own seed and dir."""
        return [*self.common, *variant.overrides, f"seed={seed}", f"logging.run_dir={self.run_dir(variant, seed)}",
                "checkpoint.resume=auto"]

    def command(self, variant: Variant, seed: int) -> list[str]:
        return ["bash", str(REPO / "launch" / "train_local.sh"), self.base, *self.overrides(variant, seed)]


def _strings(key: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{key}: expected a list of 'key.path=value' strings, got {value!r}")
    return list(value)


def _yaml_value(value) -> str:
    """A grid value as override text that YAML reads back as the same value (JSON is YAML)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else json.dumps(value)


def expand_grid(grid: dict, prefix: str = "", key: str = "grid") -> list[Variant]:
    """One variant per combination of the grid's values, in the order the keys and values are written."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{key}: expected a mapping key.path -> [values], e.g. {{npt.rank: [32, 64]}}")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key}.{k}: expected a non-empty list of values, got {values!r}")
    out = []
    for combo in itertools.product(*grid.values()):
        sets = [f"{k}={_yaml_value(v)}" for k, v in zip(grid, combo)]
        parts = [f"{k.split('.')[-1]}={_yaml_value(v)}" for k, v in zip(grid, combo)]
        out.append(Variant("-".join(([prefix] if prefix else []) + parts), sets))
    return out


def expand_variants(entries: list | None, grid: dict | None) -> list[Variant]:
    """`variants` entries ({name, set} or {grid, prefix}) then a top-level `grid`; names must be unique."""
    variants: list[Variant] = []
    for i, entry in enumerate(entries or []):
        key = f"variants[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: expected {{name: NAME, set: [key.path=value, ...]}} or {{grid: {{...}}}}")
        extra = set(entry) - {"name", "set", "grid", "prefix", "seeds", "family"}
        if extra:
            raise ConfigError(f"{key}: unknown key {sorted(extra)[0]!r}; allowed: name, set, grid, prefix, seeds, family")
        seeds = None if "seeds" not in entry else _seeds(f"{key}.seeds", entry["seeds"])
        family = None if entry.get("family") is None else str(entry["family"])
        if "grid" in entry:
            variants += [Variant(v.name, _strings(f"{key}.set", entry.get("set")) + v.overrides, seeds, family)
                         for v in expand_grid(entry["grid"], str(entry.get("prefix", "")), f"{key}.grid")]
        elif "name" in entry:
            variants.append(Variant(str(entry["name"]), _strings(f"{key}.set", entry.get("set")), seeds, family))
        else:
            raise ConfigError(f"{key}: needs a name (or a grid)")
    if grid:
        variants += expand_grid(grid)
    if not variants:
        raise ConfigError("variants: the sweep has no variants; add variants: [{name: baseline}] or a grid")
    names = [v.name for v in variants]
    for v in variants:
        if names.count(v.name) > 1:
            raise ConfigError(f"variants: the name {v.name!r} is used twice; names become run dirs, make them unique")
        if not v.name or "/" in v.name or v.name.startswith("."):
            raise ConfigError(f"variants: {v.name!r} cannot be a directory name; use letters, digits, - and _")
    return variants


def _seeds(key: str, seeds) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ConfigError(f"{key}: expected a non-empty list of integers, got {seeds!r}")
    return seeds


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every run's config is validated with load_config before any runs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {str(p)!r} not found; pass one such as sweeps/demo_ablation.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with base, sweep_dir, variants")
    extra = set(data) - set(SWEEP_KEYS)
    if extra:
        raise ConfigError(f"{p}: unknown key {sorted(extra)[0]!r}; allowed: {', '.join(SWEEP_KEYS)}")
    for key in ("base", "sweep_dir"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{key}: the sweep file needs {key}: (e.g. base: configs/smollm2_demo.yaml, "
                              "sweep_dir: runs/sweeps/NAME)")
    seeds = _seeds("seeds", data.get("seeds", [0]))
    ranks = data.get("num_ranks", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ConfigError(f"num_ranks: expected a positive integer, got {ranks!r}")
    # paths as the user wrote them, relative to where the sweep is started (runs launch from the repo root)
    sweep = Sweep(str(Path(data["base"]).resolve()), Path(data["sweep_dir"]).resolve(), ranks, seeds, _strings("set", data.get("set")),
                  expand_variants(data.get("variants"), data.get("grid")))
    for v in sweep.variants:
        try:
            load_config(sweep.base, sweep.overrides(v, sweep.seeds_of(v)[0]))
        except ConfigError as exc:
            raise ConfigError(f"variant {v.name!r}: {exc}") from None
    return sweep


# ------------------------------------------------------------------------------------------ running

LAUNCHER_NOISE = ("npt-ds: the job failed", "[INFO]", "[WARNING]", "+ deepspeed", "+ bash")


def last_error(stderr: str) -> str:
    """The run's error: its last `npt-ds ...:` line, else the last line that is not launcher chatter."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("npt-ds train:") or "Error" in ln.split(":")[0]]
    if own:
        return own[-1]
    useful = [ln for ln in lines if not any(n in ln for n in LAUNCHER_NOISE)]
    return (useful or lines or ["exited non-zero with no stderr"])[-1]


def run_one(sweep: Sweep, variant: Variant, seed: int) -> dict:
    """Launch one run (resuming it if half done); its status, wall time and error go to sweep_status.json."""
    run_dir = sweep.run_dir(variant, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    status_file = run_dir / "sweep_status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {"wall_s": 0.0, "launches": 0}
    env = {**os.environ, "NUM_RANKS": str(sweep.num_ranks), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("MASTER_PORT", None)  # each launch picks a free port
    env.pop("NPT_DS_RESTART", None)
    t0 = time.time()
    with open(run_dir / "stdout.log", "a") as out, open(run_dir / "stderr.log", "a") as err:
        err.write(f"\n=== npt-ds sweep launch {status['launches'] + 1} at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        err.flush()
        start = err.tell()
        proc = subprocess.run(sweep.command(variant, seed), cwd=REPO, env=env, stdout=out, stderr=err)
    status["wall_s"] += time.time() - t0
    status["launches"] += 1
    status["rc"] = proc.returncode
    with open(run_dir / "stderr.log") as f:
        f.seek(start)
        status["error"] = last_error(f.read()) if proc.returncode else None
    status_file.write_text(json.dumps(status, indent=2))
    return status


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", help="sweep YAML (sweeps/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")


def run_sweep(args) -> int:
    sweep = load_sweep(args.sweep_file)
    runs = sweep.runs()
    if args.dry_run:
        for v, s in runs:
            print(" ".join(sweep.command(v, s)))
        print(f"{len(sweep.variants)} variants, {len(runs)} runs -> {sweep.sweep_dir}")
        return 0
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    for i, (v, s) in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {v.name} seed {s}"
        if final_eval(sweep, v, s) is not None:
            print(f"{tag}: finished earlier, skipped", flush=True)
            continue
        print(f"{tag}: running -> {sweep.run_dir(v, s)}", flush=True)
        status = run_one(sweep, v, s)
        print(f"{tag}: {'done' if status['rc'] == 0 else 'FAILED: ' + status['error']} "
              f"({status['wall_s']:.0f} s)", flush=True)
    results = collect(sweep)
    for line in write_reports(sweep.sweep_dir, results):
        print(line)
    failed = sum(1 for r in results["variants"] if r["failed_seeds"])
    print(f"{len(results['variants'])} variants, {failed} with failed runs -> {sweep.sweep_dir}/results.md")
    return 0
