"""npt-ds sweep on the tiny model: grid expansion, validation, a half-done sweep resumed, a failing run recorded.

One module fixture stages what an interrupted sweep leaves behind -- one run finished, one stopped at step 2 of 4
(checkpointed, as a kill after a save would) -- then runs `npt-ds sweep`, which must skip the first, resume the
second from its checkpoint, record the third's failure as a row and write the table and plot.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npt_ds.cli import main
from npt_ds.config import ConfigError
from npt_ds.tools.sweep import expand_variants, last_error, load_sweep
from npt_ds.tools.sweep_report import metric_rows

REPO = Path(__file__).resolve().parents[2]

SWEEP = """\
base: {repo}/configs/tiny_debug.yaml
sweep_dir: {out}
num_ranks: 1
seeds: [0]
set: [schedule.total_steps=4, checkpoint.every=2, data.eval_batches=1, logging.console=false]
variants:
  - {{name: done}}
  - {{name: half, set: [npt.modulation_scale=0.2]}}
  - {{name: broken, set: [data.eval_batches=100000]}}
"""


def test_grid_expansion_names_and_overrides():
    variants = expand_variants([{"name": "baseline"},
                                {"grid": {"npt.rank": [32, 64], "npt.num_ranks": [1, 4]}, "prefix": "rk",
                                 "set": ["npt.dual=true"]}],
                               {"loss.layerwise_scaling": [False, True]})
    assert [(v.name, v.overrides) for v in variants] == [
        ("baseline", []),
        ("rk-rank=32-num_ranks=1", ["npt.dual=true", "npt.rank=32", "npt.num_ranks=1"]),
        ("rk-rank=32-num_ranks=4", ["npt.dual=true", "npt.rank=32", "npt.num_ranks=4"]),
        ("rk-rank=64-num_ranks=1", ["npt.dual=true", "npt.rank=64", "npt.num_ranks=1"]),
        ("rk-rank=64-num_ranks=4", ["npt.dual=true", "npt.rank=64", "npt.num_ranks=4"]),
        ("layerwise_scaling=false", ["loss.layerwise_scaling=false"]),
        ("layerwise_scaling=true", ["loss.layerwise_scaling=true"]),
    ]


def test_bad_sweep_files_name_the_key(tmp_path, capsys):
    base = f"base: {REPO}/configs/tiny_debug.yaml\nsweep_dir: {tmp_path}/s\n"
    cases = {
        "variants:\n  - {name: a, set: [loss.direct_weigth=2]}\n": "variant 'a': unknown config key 'loss.direct_weigth'",
        "variants:\n  - {name: a}\n  - {name: a}\n": "the name 'a' is used twice",
        "grid: {npt.rank: []}\n": "grid.npt.rank: expected a non-empty list",
        "seeds: [0, x]\nvariants: [{name: a}]\n": "seeds: expected a non-empty list of integers",
        "variants: [{name: a, seeds: []}]\n": "variants[0].seeds: expected a non-empty list of integers",
        "variants: [{name: a, sett: []}]\n": "variants[0]: unknown key 'sett'",
    }
    for body, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(base + body)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["npt-ds sweep: variants[0]: unknown key 'sett'; allowed: name, set, grid, prefix, seeds, family"]


def test_last_error_prefers_the_trainers_line():
    stderr = ("[2026-12-01 10:00:00] [INFO] [launch.py] starting\nnpt-ds train: data.path: not a prepared dir\n"
              "[2026-12-01 10:00:01] [INFO] [launch.py] exiting\nnpt-ds: the job failed (exit 2)\n")
    assert last_error(stderr) == "npt-ds train: data.path: not a prepared dir"
    assert last_error("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n+ deepspeed x\n") \
        == "RuntimeError: boom"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    path = base / "sweep.yaml"
    path.write_text(SWEEP.format(repo=REPO, out=base / "out"))
    sweep = load_sweep(path)
    done, half, _ = sweep.variants
    env = {**os.environ, "NUM_RANKS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    for variant, extra in ((done, []), (half, ["schedule.stop_at=2"])):  # what an interrupted sweep leaves
        proc = subprocess.run(sweep.command(variant, 0) + extra, cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    before = (sweep.run_dir(done, 0) / "metrics.jsonl").read_text()
    out = subprocess.run([sys.executable, "-m", "npt_ds.cli", "sweep", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return sweep, before, out.stdout


@pytest.mark.slow
def test_finished_run_is_not_rerun(swept):
    sweep, before, stdout = swept
    done = sweep.variants[0]
    assert "[1/3] done seed 0: finished earlier, skipped" in stdout
    assert (sweep.run_dir(done, 0) / "metrics.jsonl").read_text() == before
    assert not (sweep.run_dir(done, 0) / "sweep_status.json").exists()  # the sweep never launched it


@pytest.mark.slow
def test_half_done_run_resumes_from_its_checkpoint(swept):
    sweep, _, stdout = swept
    rows = metric_rows(sweep.run_dir(sweep.variants[1], 0))
    assert [r["step"] for r in rows if r.get("event") == "start"] == [0, 2]
    assert [r["step"] for r in rows if r.get("event") == "train"] == [1, 2, 3, 4]  # nothing trained twice
    assert [r["step"] for r in rows if r.get("event") == "eval"] == [0, 4]
    assert "[2/3] half seed 0: done" in stdout


@pytest.mark.slow
def test_failing_run_is_a_row_with_its_error(swept):
    sweep, _, stdout = swept
    results = json.loads((sweep.sweep_dir / "results.json").read_text())
    by_name = {r["name"]: r for r in results["variants"]}
    assert list(by_name) == ["done", "half", "broken"]
    broken = by_name["broken"]
    assert broken["failed_seeds"] == [0] and broken["ppl_ratio"] is None
    assert broken["error"].startswith("npt-ds train: data: held-out text has only")
    assert "lower data.eval_batches" in broken["error"]
    table = (sweep.sweep_dir / "results.md").read_text()
    assert "| broken | 0/1 | - |" in table and "held-out text has only" in table
    for name in ("done", "half"):
        row, run = by_name[name], by_name[name]["runs"][0]
        ev = [r for r in metric_rows(Path(run["run_dir"])) if r.get("event") == "eval"][-1]
        assert row["ppl_ratio"] == pytest.approx(ev["eval/ppl_npt"] / ev["eval/ppl_base"], rel=1e-12)
        assert row["fidelity_mse"] == ev["eval/fidelity_mse"] and row["ppl_ratio_spread"] == 0.0
        assert sorted(row["direct_mse_student_in"]) == ["2", "3"] == sorted(row["v_a_attn_sim"])
        assert row["direct_mse_student_in"]["3"] == ev["eval/layer/3/direct_mse_student_in"]
        assert row["tokens_per_s"] > 0 and f"| {name} | 1/1 | {row['ppl_ratio']:.4g} |" in table
    assert by_name["half"]["wall_s"] > 0 and by_name["done"]["wall_s"] is None  # run outside the sweep
    plot = (sweep.sweep_dir / "results_plot.txt").read_text()
    assert f"  1  {by_name['done']['ppl_ratio']:.4f}  done" in plot and "broken" not in plot


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_sweep_files_validate(path):
    sweep = load_sweep(path)  # every variant's config goes through load_config
    # two seeds at least where a result is claimed: the whole sweep, or a screening sweep's confirmation runs
    assert sweep.variants and max(len(sweep.seeds_of(v)) for v in sweep.variants) >= 2


def test_mean_and_spread_over_seeds(tmp_path):
    from npt_ds.tools.sweep_report import collect, markdown

    path = tmp_path / "s.yaml"
    path.write_text(f"base: {REPO}/configs/tiny_debug.yaml\nsweep_dir: {tmp_path}/out\nseeds: [0, 1, 2]\n"
                    "set: [schedule.total_steps=4]\nvariants: [{name: a}]\n")
    sweep = load_sweep(path)
    for seed, (base, npt, mse) in enumerate([(10.0, 11.0, 0.5), (10.0, 13.0, 0.7)]):  # seed 2 never ran
        run = sweep.run_dir(sweep.variants[0], seed)
        run.mkdir(parents=True)
        rows = [{"step": 0, "event": "eval", "eval/ppl_base": 1.0, "eval/ppl_npt": 9.0, "eval/fidelity_mse": 9.0},
                {"step": 4, "event": "train", "tokens_per_s": 100.0 * (seed + 1), "tokens": 512},
                {"step": 4, "event": "eval", "eval/ppl_base": base, "eval/ppl_npt": npt, "eval/fidelity_mse": mse,
                 "eval/layer/3/direct_mse_student_in": mse * 2, "eval/layer/3/v_a_attn_sim": 0.1 * (seed + 1)}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = collect(sweep)["variants"]
    assert row["ppl_ratio"] == pytest.approx(1.2) and row["ppl_ratio_spread"] == pytest.approx(0.1414213562, rel=1e-9)
    assert row["fidelity_mse"] == pytest.approx(0.6) and row["tokens_per_s"] == pytest.approx(150.0)
    assert row["direct_mse_student_in"] == {"3": pytest.approx(1.2)} and row["v_a_attn_sim"] == {"3": pytest.approx(0.15)}
    assert row["seeds_done"] == 2 and row["failed_seeds"] == [2] and row["error"] == "not run yet"
    assert row["v_a_attn_sim_mean"] == pytest.approx(0.15) and row["tokens"] == 512
    assert row["runs"][0]["bars_met"] == [False, False]
    assert ("| a | 2/3 | 1.2 ± 0.14 | ref | 0.6 ± 0.14 | 0.15 ± 0.071 | ✗ ✗ | 3:1.2 | 3:0.15 | 512 | 150 ± 71 | - "
            "| not run yet |") in markdown(collect(sweep))


def test_variant_seeds_and_a_budget_curve_of_one_family(tmp_path):
    from npt_ds.tools.sweep_report import collect, curves, write_reports

    path = tmp_path / "s.yaml"
    path.write_text(f"base: {REPO}/configs/tiny_debug.yaml\nsweep_dir: {tmp_path}/out\nseeds: [0]\n"
                    "variants:\n  - {name: screen}\n  - {name: confirm, seeds: [0, 1]}\n"
                    "  - {grid: {schedule.total_steps: [4, 8, 16]}, prefix: budget, family: recipe}\n")
    sweep = load_sweep(path)
    assert [(v.name, s) for v, s in sweep.runs()] == [
        ("screen", 0), ("confirm", 0), ("budget-total_steps=4", 0), ("budget-total_steps=8", 0),
        ("budget-total_steps=16", 0), ("confirm", 1)]  # every variant once before any second seed
    assert [v.family for v in sweep.variants] == [None, None, "recipe", "recipe", "recipe"]
    for v, steps, ratio in ((sweep.variants[2], 4, 1.5), (sweep.variants[4], 16, 1.1)):  # total_steps=8 not run
        run = sweep.run_dir(v, 0)
        run.mkdir(parents=True)
        rows = [{"step": steps, "event": "train", "tokens": 128 * steps},
                {"step": steps, "event": "eval", "eval/ppl_base": 10.0, "eval/ppl_npt": 10.0 * ratio,
                 "eval/fidelity_mse": 0.05, "eval/layer/3/v_a_attn_sim": 0.8}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = collect(sweep)
    assert results["variants"][1]["seeds"] == [0, 1] and results["variants"][1]["seeds_done"] == 0
    assert curves(results) == {"recipe": [(512, pytest.approx(1.5), 0.0), (2048, pytest.approx(1.1), 0.0)]}
    lines = write_reports(sweep.sweep_dir, results)
    assert any("| ✓ ✓ |" in line for line in lines)  # both bars met: similarity 0.8, fidelity 0.05
    curve = sweep.sweep_dir / ("curve.png" if (sweep.sweep_dir / "curve.png").exists() else "curve_plot.txt")
    assert f"plot: {curve}" in lines
    if curve.suffix == ".txt":
        assert "recipe: 512 tok -> 1.5000, 2,048 tok -> 1.1000" in curve.read_text()


def test_differences_from_the_reference_are_judged_against_the_seed_spread():
    from npt_ds.tools.sweep_report import _compare_with_reference, markdown

    def entry(name, ratio, spread, seeds=2):
        return {"name": name, "ppl_ratio": ratio, "ppl_ratio_spread": spread, "seeds_done": seeds, "error": None,
                "fidelity_mse": None, "fidelity_mse_spread": None, "tokens_per_s": None, "tokens_per_s_spread": None,
                "wall_s": None, "wall_s_spread": None, "direct_mse_student_in": {}, "v_a_attn_sim": {}}

    variants = [entry("base", 1.20, 0.006), entry("same", 1.21, 0.008), entry("better", 1.15, 0.008),
                entry("one-seed", 1.10, 0.0, seeds=1), entry("failed", None, None, seeds=0)]
    _compare_with_reference(variants)
    # pooled SD sqrt((0.006^2 + 0.008^2) / 2) = 0.00707: 0.01 is within 2 x that, 0.05 is beyond
    assert [(v["ppl_delta"], v["beyond_noise"]) for v in variants] == [
        (None, None), (pytest.approx(0.01), False), (pytest.approx(-0.05), True), (pytest.approx(-0.10), None),
        (None, None)]
    table = markdown({"base": "b", "common": [], "seeds": [0, 1], "num_ranks": 1, "variants": variants})
    assert [line.split(" | ")[3] for line in table[4:]] == ["ref", "+0.0100", "-0.0500 *", "-0.1000", "-"]
