"""``npt-monitor --once``: the dashboard as plain text (header, system/ranks, sparklines, alerts), for ssh
scripts and CI logs."""

from __future__ import annotations

import math

from .ranks import rank_rows, system_columns, system_line
from .run import Run
from .formatting import fmt_num, format_eta, format_rate

BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_KEYS = ("loss/total", "grad_norm", "tokens_per_s", "time/step_max_s", "mem/peak_alloc_gb", "perf/mfu", "kd/kl")


def sparkline(ys, width: int = 48) -> str:
    """`ys` (finite floats) as `width` block characters (the mean of each bucket), min..max scaled."""
    ys = [y for y in ys if math.isfinite(y)]
    if not ys:
        return ""
    if len(ys) > width:
        edges = [round(i * len(ys) / width) for i in range(width + 1)]
        ys = [sum(ys[a:b]) / (b - a) for a, b in zip(edges, edges[1:]) if b > a]
    lo, hi = min(ys), max(ys)
    span = hi - lo
    return "".join(BLOCKS[min(len(BLOCKS) - 1, int((y - lo) / span * len(BLOCKS))) if span > 0 else 0] for y in ys)


def render_once(run: Run, width: int = 48) -> str:
    """The text dashboard of one run (already read)."""
    state = run.state
    h = state.header()
    lines = [f"== {h.name}  step {h.step if h.step is not None else '--'}/{h.total_steps or '--'}"
             f"  stage {h.stage or '--'}  {format_rate(h.tokens_per_s)} tok/s  ETA {format_eta(h.eta_s)}"
             f"  skipped {h.skipped_steps}  lines {h.lines}"]
    system = system_line(state.latest)
    if system:
        lines.append("   " + system)
    rows = rank_rows(state.latest)
    if rows:
        columns = system_columns(rows)

        def figures(row) -> str:
            shown = [("!" if f in row.worst else "") + fmt.format(row.system[f]) for f, _, fmt in columns
                     if f in row.system]
            return "".join(" " + v for v in shown)

        legend = [m for m, on in (("* slowest", any(r.slowest for r in rows)), ("! worst", any(r.worst for r in rows)))
                  if on]
        lines.append("   ranks: " + "  ".join(
            f"{'*' if row.slowest else ''}r{row.rank} {fmt_num(row.step_s, 3)}s {fmt_num(row.mem_gb, 3)}GB"
            f"{figures(row)}" for row in rows) + (f"   ({', '.join(legend)})" if legend else ""))
    for key in SPARK_KEYS:
        series = state.series.get(key)
        if series is None or not len(series):
            continue
        lines.append(f"   {key:<20} {sparkline(list(series.ys), width):<{width}}  "
                     f"{fmt_num(min(series.ys))} .. {fmt_num(max(series.ys))}  last {fmt_num(series.last_y)}")
    for alert in run.alerts:
        lines.append("   " + alert.format())
    if run.dropped_alerts:
        lines.append(f"   ... {run.dropped_alerts} more alerts not shown")
    return "\n".join(lines)
