"""Ranks/system panel: per-rank own step time and peak memory of the latest log step, the straggler
highlighted, and one line of step time / memory / TFLOP/s / MFU.  Hidden while the run logs no ranks."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..ranks import rank_rows, system_parts
from ..formatting import fmt_num


class RanksPanel(Static):
    def show(self, latest: dict[str, float]) -> None:
        rows = rank_rows(latest)
        self.display = bool(rows)
        if not rows:
            return
        table = Table.grid(padding=(0, 1))
        for _ in range(3):
            table.add_column(justify="right")
        table.add_row(Text("rank", style="bold"), Text("step s", style="bold"), Text("mem GB", style="bold"))
        for rank, step_s, mem_gb, slowest in rows:
            style = "bold red" if slowest else ""
            table.add_row(Text(f"{'*' if slowest else ''}{rank}", style=style), Text(fmt_num(step_s, 3), style=style),
                          Text(fmt_num(mem_gb, 3)))
        grid = Table.grid()
        for part in system_parts(latest):
            grid.add_row(Text(part, style="dim", overflow="ellipsis", no_wrap=True))
        grid.add_row(table)
        self.update(grid)
