"""Per-layer table: direct MSE, v_a/v_b norms, v_a-attention similarity (latest values), and the latest
held-out direct MSE of each layer on the teacher's input (ρ=0) and inside the NPT model (ρ=1)."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import DataTable

from ..formatting import fmt_num
from ..state import LAYER_FIELDS

COLUMNS = (
    ("layer", "layer"),
    ("direct_mse", "direct MSE"),
    ("v_a_norm", "‖v_a‖"),
    ("v_b_norm", "‖v_b‖"),
    ("v_a_attn_sim", "attn sim"),
    ("eval/direct_mse_teacher_in", "eval ρ=0"),
    ("eval/direct_mse_student_in", "eval ρ=1"),
)


def _cell(v: float | None) -> Text:
    style = "bold red" if v is not None and not math.isfinite(v) else ""
    return Text(fmt_num(v), style=style, justify="right")


class LayerTable(DataTable):
    """Rows are NPT layer indices; refreshed from ``RunState.layers()``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="none", zebra_stripes=True, **kwargs)
        self._rows: dict[int, tuple] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show_layers(self, layers: dict[int, dict[str, float]]) -> None:
        if list(layers) != list(self._rows):
            self.clear()
            self._rows = {}
            for i, vals in layers.items():
                row = tuple(vals.get(f) for f in LAYER_FIELDS)
                self.add_row(Text(str(i), justify="right"), *map(_cell, row), key=str(i))
                self._rows[i] = row
            return
        for i, vals in layers.items():
            row = tuple(vals.get(f) for f in LAYER_FIELDS)
            old = self._rows[i]
            if row == old:
                continue
            for f, v, o in zip(LAYER_FIELDS, row, old):
                if v != o:
                    self.update_cell(str(i), f, _cell(v))
            self._rows[i] = row
