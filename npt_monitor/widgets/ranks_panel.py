"""Ranks/system panel: per-rank own step time, peak memory and system figures (GPU utilisation, memory, power,
temperature, or CPU %) of the latest log step, the straggler and each column's worst rank highlighted, and one
line of step time / memory / TFLOP/s / MFU.  Hidden while the run logs no ranks."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..formatting import fmt_num
from ..ranks import rank_rows, system_columns, system_parts

TITLE = "ranks (* slowest, ! worst)"


class RanksPanel(Static):
    def show(self, latest: dict[str, float]) -> None:
        rows = rank_rows(latest)
        self.display = bool(rows)
        if not rows:
            return
        columns = system_columns(rows)
        table = Table.grid(padding=(0, 1))
        for _ in range(3 + len(columns)):
            table.add_column(justify="right", no_wrap=True)
        table.add_row(*(Text(t, style="bold") for t in ("rank", "step", "mem", *(c[1] for c in columns))))
        for row in rows:
            style = "bold red" if row.slowest else ""
            cells = [Text(f"{'*' if row.slowest else ''}{row.rank}", style=style),
                     Text(fmt_num(row.step_s, 3), style=style), Text(fmt_num(row.mem_gb, 3))]
            for field, _, _ in columns:  # whole numbers: the panel is narrow
                bad, value = field in row.worst, row.system.get(field)
                cells.append(Text(("!" if bad else "") + ("--" if value is None else f"{value:.0f}"),
                                  style="bold yellow" if bad else ""))
            table.add_row(*cells)
        grid = Table.grid()
        parts = system_parts(latest)
        if parts:  # one wrapped paragraph (a line each would push the ranks out of sight)
            grid.add_row(Text("  ".join(parts), style="dim"))
        grid.add_row(table)
        grid.add_row(Text(units(columns), style="dim"))
        self.update(grid)


def units(columns: list[tuple[str, str, str]]) -> str:
    """The table's units, under it (the headers stay one word each: the panel is narrow)."""
    shown = {field for field, _, _ in columns}
    parts = ["step s", "mem GB (torch peak)"]
    parts += [text for field, text in (("gpu_util", "util %"), ("gpu_mem_gb", "gpu GB (device)"),
                                        ("cpu_pct", "cpu % of a core")) if field in shown]
    return " · ".join(parts)
