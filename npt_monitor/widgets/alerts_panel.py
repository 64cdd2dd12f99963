"""Persistent list of alerts (newest at the bottom), each with its step."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ..alerts import ERROR, Alert


def alert_text(alert: Alert) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    colour = "red" if alert.severity == ERROR else "yellow"
    t.append("● " if alert.severity == ERROR else "▲ ", style=f"bold {colour}")
    t.append(f"{alert.step:>7,} ", style="bold")
    t.append(f"{alert.kind:<11} ", style=colour)
    t.append(alert.message)
    return t


class AlertsPanel(OptionList):
    """Alerts of one run; the highlighted one is what the jump key jumps to."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alerts: list[Alert] = []

    def sync(self, alerts: list[Alert], dropped: int = 0) -> None:
        """Show ``alerts`` (the run's full list): append new ones, or rebuild after a reset."""
        n = len(self.alerts)
        if len(alerts) < n or (n and alerts[n - 1] is not self.alerts[n - 1]):
            self.clear_options()
            self.alerts = []
            n = 0
        new = alerts[n:]
        if new:
            self.add_options([Option(alert_text(a)) for a in new])
            self.alerts.extend(new)
        title = f"Alerts ({len(self.alerts)}{f', {dropped} dropped' if dropped else ''})"
        if self.border_title != title:
            self.border_title = title

    @property
    def selected_alert(self) -> Alert | None:
        if self.highlighted is None or not (0 <= self.highlighted < len(self.alerts)):
            return None
        return self.alerts[self.highlighted]
