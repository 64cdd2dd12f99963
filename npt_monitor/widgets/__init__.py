"""Textual widgets and screens of npt-monitor (one per module)."""

from .alerts_panel import AlertsPanel
from .header import RunHeader
from .help import HelpScreen
from .layers import LayerTable
from .picker import MetricPickerScreen
from .plot import MetricPlot
from .ranks_panel import RanksPanel
from .run_view import RunView

__all__ = ["AlertsPanel", "HelpScreen", "LayerTable", "MetricPickerScreen", "MetricPlot", "RanksPanel", "RunHeader", "RunView"]
