"""A sweep's table: per-run numbers from each run dir, mean ± spread over seeds, results.{json,md} and a plot.

Per run (its final eval line, sweep_status.json and train lines): ppl ratio = ppl_npt / ppl_base, fidelity MSE,
per-layer in-model MSE (eval/layer/{i}/direct_mse_student_in) and v_a-attention similarity
(eval/layer/{i}/v_a_attn_sim), mean tokens/s of the train lines, wall time.  Spread = sample standard
deviation over the seeds that finished (0 with one seed).  Each variant's ppl ratio is also compared with the
first variant's (the reference, e.g. the baseline): the difference of the means, and whether it is beyond the
seed-to-seed noise, |diff| > 2 x the pooled seed SD (with 2 seeds each that SD is the standard error of the
difference of the two means, so this is a ~2-sigma call; it needs >= 2 finished seeds on both).  The plot is results.png when matplotlib is
importable, else results_plot.txt drawn by plotext.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import plotext as plt

from ..config import load_config

SCALARS = ("ppl_ratio", "fidelity_mse", "tokens_per_s", "wall_s")


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def final_eval(sweep, variant, seed: int) -> dict | None:
    """The eval line at step == total_steps, or None while the run is not finished."""
    total = load_config(sweep.base, sweep.overrides(variant, seed)).schedule.total_steps
    evals = [r for r in metric_rows(sweep.run_dir(variant, seed)) if r.get("event") == "eval"
             and r.get("step") == total]
    return evals[-1] if evals else None


def run_numbers(sweep, variant, seed) -> dict:
    run_dir = sweep.run_dir(variant, seed)
    status_file = run_dir / "sweep_status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    ev = final_eval(sweep, variant, seed)
    row = {"seed": seed, "run_dir": str(run_dir), "wall_s": status.get("wall_s")}
    if ev is None:
        row["error"] = status.get("error") or ("not run yet" if not status else f"exit {status.get('rc')}, "
                                                "no final eval")
        return row
    tps = [r["tokens_per_s"] for r in metric_rows(run_dir) if r.get("event") == "train" and "tokens_per_s" in r]
    row.update({"ppl_ratio": ev["eval/ppl_npt"] / ev["eval/ppl_base"], "ppl_base": ev["eval/ppl_base"],
                "ppl_npt": ev["eval/ppl_npt"], "fidelity_mse": ev["eval/fidelity_mse"],
                "tokens_per_s": statistics.fmean(tps) if tps else None, "step": ev["step"]})
    for metric in ("direct_mse_student_in", "v_a_attn_sim"):
        row[metric] = {k.split("/")[2]: v for k, v in ev.items()
                       if k.startswith("eval/layer/") and k.endswith("/" + metric)}
    return row


def _mean_spread(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(sweep) -> dict:
    """results.json's content: one entry per variant, with its runs and mean/spread over the finished ones."""
    variants = []
    for v in sweep.variants:
        runs = [run_numbers(sweep, v, s) for s in sweep.seeds]
        ok = [r for r in runs if "error" not in r]
        entry = {"name": v.name, "overrides": v.overrides, "runs": runs, "seeds_done": len(ok),
                 "failed_seeds": [r["seed"] for r in runs if "error" in r],
                 "error": next((r["error"] for r in runs if "error" in r), None)}
        for key in SCALARS:
            entry[key], entry[f"{key}_spread"] = _mean_spread([r.get(key) for r in (ok if key != "wall_s" else runs)])
        for metric in ("direct_mse_student_in", "v_a_attn_sim"):
            layers = sorted({i for r in ok for i in r[metric]}, key=int)
            entry[metric] = {i: _mean_spread([r[metric].get(i) for r in ok])[0] for i in layers}
        variants.append(entry)
    _compare_with_reference(variants)
    return {"base": sweep.base, "common": sweep.common, "seeds": sweep.seeds, "num_ranks": sweep.num_ranks,
            "variants": variants}


def _compare_with_reference(variants: list[dict]) -> None:
    """`ppl_delta` (this variant's mean ppl ratio - the first variant's) and `beyond_noise` on every entry."""
    ref = variants[0] if variants else None
    for entry in variants:
        entry["ppl_delta"] = entry["beyond_noise"] = None
        if entry is ref or ref["ppl_ratio"] is None or entry["ppl_ratio"] is None:
            continue
        entry["ppl_delta"] = entry["ppl_ratio"] - ref["ppl_ratio"]
        if min(entry["seeds_done"], ref["seeds_done"]) >= 2:
            pooled = math.sqrt((entry["ppl_ratio_spread"] ** 2 + ref["ppl_ratio_spread"] ** 2) / 2)
            entry["beyond_noise"] = abs(entry["ppl_delta"]) > 2 * pooled


def _delta(entry: dict, is_ref: bool) -> str:
    if is_ref:
        return "ref"
    if entry["ppl_delta"] is None:
        return "-"
    return f"{entry['ppl_delta']:+.4f}" + (" *" if entry["beyond_noise"] else "")


def _fmt(mean, spread, digits=4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}g} ± {spread:.2g}" if spread else f"{mean:.{digits}g}"


def _layers(values: dict) -> str:
    return " ".join(f"{i}:{v:.3g}" for i, v in values.items() if v is not None) or "-"


def markdown(results: dict) -> list[str]:
    n = len(results["seeds"])
    lines = [f"Base recipe `{results['base']}`, common overrides `{' '.join(results['common']) or '-'}`, "
             f"seeds {results['seeds']}, {results['num_ranks']} rank(s). Mean ± sample std over the seeds that "
             "finished. Δ: the ppl ratio minus the first variant's; * marks a difference beyond the seed-to-seed "
             "noise (|Δ| > 2 × the pooled seed SD).", "",
             "| variant | seeds | NPT/base ppl | Δ | fidelity MSE | in-model MSE per layer | v_a-attn sim per layer "
             "| tokens/s | wall s | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(results["variants"]):
        cells = [r["name"], f"{r['seeds_done']}/{n}", _fmt(r["ppl_ratio"], r["ppl_ratio_spread"]), _delta(r, k == 0),
                 _fmt(r["fidelity_mse"], r["fidelity_mse_spread"], 3), _layers(r["direct_mse_student_in"]),
                 _layers(r["v_a_attn_sim"]), _fmt(r["tokens_per_s"], r["tokens_per_s_spread"], 3),
                 _fmt(r["wall_s"], r["wall_s_spread"], 3), (r["error"] or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(out_dir: Path, results: dict) -> Path | None:
    """PPL ratio per variant: a matplotlib PNG if it is importable, else a plotext text chart."""
    done = [r for r in results["variants"] if r["ppl_ratio"] is not None and math.isfinite(r["ppl_ratio"])]
    if not done:
        return None
    names, ratios = [r["name"] for r in done], [r["ppl_ratio"] for r in done]
    try:  # lazy: matplotlib is optional (not a dependency); plotext draws the text chart without it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as mpl
    except ImportError:
        fig = plt.figure
        fig.clear()
        fig.plot_size(max(40, 6 * len(names) + 10), 16)
        fig.title("NPT/base perplexity ratio per variant (numbers: key below)")
        fig.draw(fig.bar([str(i) for i in range(1, len(names) + 1)], ratios))
        key = [f"{i:>3}  {r:.4f}  {n}" for i, (n, r) in enumerate(zip(names, ratios), 1)]
        path = out_dir / "results_plot.txt"
        path.write_text(plt.uncolorize(fig.build()) + "\n" + "\n".join(key) + "\n")
        return path
    fig, ax = mpl.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    ax.bar(names, ratios, yerr=[r["ppl_ratio_spread"] or 0 for r in done], capsize=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("NPT / base perplexity")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    path = out_dir / "results.png"
    fig.savefig(path)
    mpl.close(fig)
    return path


def write_reports(out_dir: Path, results: dict) -> list[str]:
    """Write results.json, results.md and the plot; return the markdown table (for the terminal)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out_dir / "results.md").write_text("\n".join(table) + "\n")
    chart = plot(out_dir, results)
    return table + ([f"plot: {chart}"] if chart else [])
