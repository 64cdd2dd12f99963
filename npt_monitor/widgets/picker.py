"""Metric picker (``m``): choose the series shown in the lower plot."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import SelectionList


class MetricPickerScreen(ModalScreen[tuple[str, ...]]):
    """Lists every numeric key seen; space/enter toggles, escape/m applies."""

    BINDINGS = [
        Binding("escape", "apply", "Apply"),
        Binding("m", "apply", "Apply"),
    ]

    def __init__(self, keys: list[str], selected: tuple[str, ...]) -> None:
        super().__init__()
        self.keys = keys
        self.selected = selected

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box") as box:
            box.border_title = "metrics (space: toggle, esc: apply)"
            yield SelectionList[str](*[(k, k, k in self.selected) for k in self.keys], id="picker")

    def action_apply(self) -> None:
        chosen = self.query_one(SelectionList).selected
        order = {k: i for i, k in enumerate(self.keys)}
        self.dismiss(tuple(sorted(chosen, key=lambda k: order.get(k, 0))))
