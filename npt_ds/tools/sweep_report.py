"""A sweep's table: per-run numbers from each run dir, mean ± spread over seeds, results.{json,md} and a plot.

Per run (its final eval line, sweep_status.json and train lines): ppl ratio = ppl_npt / ppl_base, fidelity MSE,
per-layer in-model MSE (eval/layer/{i}/direct_mse_student_in) and v_a-attention similarity
(eval/layer/{i}/v_a_attn_sim), the seed documents' success bars (its mean over layers > 0.7, fidelity MSE < 0.1),
training tokens (the last train line's count), mean tokens/s of the train lines, wall time.  Spread = sample standard
deviation over the seeds that finished (0 with one seed).  Each variant's ppl ratio is also compared with the
first variant's (the reference, e.g. the baseline): the difference of the means, and whether it is beyond the
seed-to-seed noise, |diff| > 2 x the pooled seed SD (with 2 seeds each that SD is the standard error of the
difference of the two means, so this is a ~2-sigma call; it needs >= 2 finished seeds on both).  The plot is results.png when matplotlib is
importable, else results_plot.txt drawn by plotext.  Variants of one ``family`` (runs of one recipe at several
token budgets) also get a curve of the ratio against training tokens: curve.png, else curve_plot.txt.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import plotext as plt

from ..config import load_config
from ..train.evaluate import FIDELITY_BAR, SIM_BAR, success_bars

SCALARS = ("ppl_ratio", "fidelity_mse", "v_a_attn_sim_mean", "tokens", "tokens_per_s", "wall_s")


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
    train = [r for r in metric_rows(run_dir) if r.get("event") == "train"]
    tps = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    bars = success_bars(ev)
    row.update({"ppl_ratio": bars["ppl_ratio"], "ppl_base": ev["eval/ppl_base"],
                "ppl_npt": ev["eval/ppl_npt"], "fidelity_mse": ev["eval/fidelity_mse"],
                "v_a_attn_sim_mean": bars["v_a_attn_sim"], "bars_met": [bars["v_a_attn_sim_met"], bars["fidelity_mse_met"]],
                "tokens": train[-1].get("tokens") if train else None,
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
        runs = [run_numbers(sweep, v, s) for s in sweep.seeds_of(v)]
        ok = [r for r in runs if "error" not in r]
        entry = {"name": v.name, "overrides": v.overrides, "family": v.family, "seeds": sweep.seeds_of(v),
                 "runs": runs, "seeds_done": len(ok),
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


def _bars(entry: dict) -> str:
    """The success bars of a variant's means: ✓ met, ✗ not (similarity first, then fidelity)."""
    if entry.get("v_a_attn_sim_mean") is None or entry.get("fidelity_mse") is None:
        return "-"
    return " ".join("✓" if met else "✗" for met in (entry["v_a_attn_sim_mean"] > SIM_BAR,
                                                     entry["fidelity_mse"] < FIDELITY_BAR))


def markdown(results: dict) -> list[str]:
    lines = [f"Base recipe `{results['base']}`, common overrides `{' '.join(results['common']) or '-'}`, "
             f"seeds {results['seeds']} (unless a variant names its own), {results['num_ranks']} rank(s). Mean ± "
             "sample std over the seeds that finished. Δ: the ppl ratio minus the first variant's; * marks a "
             "difference beyond the seed-to-seed noise (|Δ| > 2 × the pooled seed SD). bars: the seed documents' "
             f"success bars, mean v_a-attn sim > {SIM_BAR} and fidelity MSE < {FIDELITY_BAR} (✓ met, ✗ not).", "",
             "| variant | seeds | NPT/base ppl | Δ | fidelity MSE | v_a-attn sim | bars | in-model MSE per layer "
             "| v_a-attn sim per layer | tokens | tokens/s | wall s | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(results["variants"]):
        n = len(r.get("seeds") or results["seeds"])
        cells = [r["name"], f"{r['seeds_done']}/{n}", _fmt(r["ppl_ratio"], r["ppl_ratio_spread"]), _delta(r, k == 0),
                 _fmt(r["fidelity_mse"], r["fidelity_mse_spread"], 3),
                 _fmt(r.get("v_a_attn_sim_mean"), r.get("v_a_attn_sim_mean_spread"), 3), _bars(r),
                 _layers(r["direct_mse_student_in"]),
                 _layers(r["v_a_attn_sim"]), _fmt(r.get("tokens"), None, 7),
                 _fmt(r["tokens_per_s"], r["tokens_per_s_spread"], 3),
                 _fmt(r["wall_s"], r["wall_s_spread"], 3), (r["error"] or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pyplot():
    """matplotlib's pyplot (Agg), or None: lazy, since matplotlib is optional (not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as mpl
    except ImportError:
        return None
    return mpl


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def plot(out_dir: Path, results: dict) -> Path | None:
    """PPL ratio per variant: a matplotlib PNG if it is importable, else a plotext text chart."""
    done = [r for r in results["variants"] if _finite(r["ppl_ratio"])]
    if not done:
        return None
    names, ratios = [r["name"] for r in done], [r["ppl_ratio"] for r in done]
    mpl = _pyplot()
    if mpl is None:
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


def curves(results: dict) -> dict[str, list[tuple[float, float, float]]]:
    """Per family with two or more finished budgets: (training tokens, mean ratio, seed SD), by tokens."""
    families: dict[str, list[tuple[float, float, float]]] = {}
    for r in results["variants"]:
        if r.get("family") and _finite(r["ppl_ratio"]) and r.get("tokens"):
            families.setdefault(r["family"], []).append((r["tokens"], r["ppl_ratio"], r["ppl_ratio_spread"] or 0.0))
    return {name: sorted(points) for name, points in families.items() if len(points) >= 2}


def plot_curves(out_dir: Path, results: dict) -> Path | None:
    """NPT/base ratio against training tokens, one line per family (separate runs at each budget)."""
    lines = curves(results)
    if not lines:
        return None
    mpl = _pyplot()
    if mpl is None:
        fig = plt.figure
        fig.clear()
        fig.plot_size(72, 20)
        fig.title("NPT/base perplexity ratio vs training tokens (one run per budget)")
        for name, points in lines.items():
            fig.draw(fig.signal([p[0] for p in points], [p[1] for p in points]).lines(True))
        key = [f"{name}: " + ", ".join(f"{p[0]:,.0f} tok -> {p[1]:.4f}" for p in points) for name, points in lines.items()]
        path = out_dir / "curve_plot.txt"
        path.write_text(plt.uncolorize(fig.build()) + "\n" + "\n".join(key) + "\n")
        return path
    fig, ax = mpl.subplots(figsize=(6.5, 4))
    for name, points in lines.items():
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (separate runs, each with its full LR schedule)")
    ax.set_ylabel("NPT / base perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "curve.png"
    fig.savefig(path)
    mpl.close(fig)
    return path


def write_reports(out_dir: Path, results: dict) -> list[str]:
    """Write results.json, results.md and the plot; return the markdown table (for the terminal)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out_dir / "results.md").write_text("\n".join(table) + "\n")
    charts = [chart for chart in (plot(out_dir, results), plot_curves(out_dir, results)) if chart]
    return table + [f"plot: {chart}" for chart in charts]
