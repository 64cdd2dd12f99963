"""The npt-monitor Textual app: one :class:`RunView` column per metrics file.

View state shared by all runs (so that runs compare step for step):

* ``paused``   - display frozen; files are still read and alerts detected.
* ``jump_step``- plots show a window around this step (an alert); ``None``
  means follow the newest steps.
* ``zoom``     - plotted step span (``None``: the whole run).
* ``log_y``    - log-scale y axes (for positive series).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import Footer, OptionList

from .alerts import Alert, AlertConfig
from .parsing import metrics_path
from .widgets import AlertsPanel, HelpScreen, MetricPickerScreen, RunView
from .widgets.plot import X_AXES, OverlayPlot

ZOOMS: tuple[int | None, ...] = (None, 5000, 1000, 200)
SMOOTHING: tuple[float, ...] = (0.0, 0.3, 0.1, 0.03)  # EMA factors the 'e' key cycles through


class MonitorApp(App[int]):
    CSS_PATH = "monitor.tcss"
    TITLE = "npt-monitor"
    AUTO_FOCUS = "AlertsPanel"

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("f", "follow", "Follow"),
        Binding("j", "jump", "Jump to alert"),
        Binding("n", "next_alert(1)", "Next alert"),
        Binding("N", "next_alert(-1)", "Prev alert", show=False),
        Binding("z", "zoom", "Zoom"),
        Binding("l", "toggle_log", "Log y"),
        Binding("m", "pick_metrics", "Metrics"),
        Binding("e", "smoothing", "Smooth"),
        Binding("x", "x_axis", "X axis"),
        Binding("o", "overlay", "Overlay"),
        Binding("s", "screenshot_svg", "SVG"),
    ]
    # (action, title, help) of the command palette's entries (ctrl+p)
    PALETTE = (
        ("toggle_pause", "Pause / resume", "freeze the display; files are still read"),
        ("follow", "Follow newest steps", "leave a jump, resume"),
        ("jump", "Jump to selected alert", "plots around the alert's step"),
        ("next_alert(1)", "Next alert", "select and jump to the next alert"),
        ("zoom", "Cycle zoom", "plotted step span"),
        ("toggle_log", "Toggle log y", "log-scale y axes"),
        ("x_axis", "Cycle x axis", "step / wall time / tokens"),
        ("overlay", "Overlay runs", "every run's total loss in one plot (one colour per run) / side by side"),
        ("smoothing", "Cycle smoothing", "EMA of the plotted lines: off, 0.3, 0.1, 0.03 (raw line stays faint)"),
        ("pick_metrics", "Pick component metrics", "choose what the lower plot shows"),
        ("screenshot_svg", "Save SVG screenshot", "next to the (first) metrics file"),
        ("help", "Help", "keys and alert rules"),
    )

    paused: reactive[bool] = reactive(False)
    jump_step: reactive[int | None] = reactive(None)
    zoom: reactive[int | None] = reactive(None)
    log_y: reactive[bool] = reactive(False)
    smooth: reactive[float] = reactive(0.0)  # EMA factor of the plotted lines, 0 = raw
    x_axis: reactive[str] = reactive("step")  # step | time | tokens
    overlay: reactive[bool] = reactive(False)  # all runs' loss in one plot instead of side by side

    def __init__(
        self,
        paths: Sequence[str | Path],
        config: AlertConfig | None = None,
        poll_interval: float = 0.2,
        refresh_interval: float = 0.25,
        zooms: tuple[int | None, ...] = ZOOMS,
        bell: bool = True,
    ) -> None:
        super().__init__()
        self.bell_on_error = bell  # new error alerts ring the terminal bell (--no-bell: off)
        if not paths:
            raise ValueError("npt-monitor needs at least one metrics file or run directory")
        self.paths = [metrics_path(p) for p in paths]
        self.config = config or AlertConfig()
        self.poll_interval = poll_interval
        self.refresh_interval = refresh_interval
        self.zooms = zooms or (None,)
        self.set_reactive(MonitorApp.zoom, self.zooms[0])

    def compose(self) -> ComposeResult:
        with Horizontal(id="runs", classes="-multi" if len(self.paths) > 1 else ""):
            for i, path in enumerate(self.paths):
                yield RunView(path, self.config, self.poll_interval, self.refresh_interval, id=f"run-{i}")
        yield OverlayPlot([], id="overlay")
        yield Footer()

    def on_mount(self) -> None:
        overlay = self.query_one(OverlayPlot)
        overlay.runs = [(v.run.state.display_name, v.run.state) for v in self.run_views]
        overlay.border_title = "overlay: total loss (o: side by side)"
        overlay.display = False
        self.set_interval(4 * self.refresh_interval, self.refresh_overlay)

    # -- helpers -------------------------------------------------------------------
    @property
    def run_views(self) -> list[RunView]:
        return list(self.query(RunView))

    def refresh_runs(self, force: bool = True) -> None:
        for view in self.run_views:
            view.refresh_view(force=force)
        self.refresh_overlay()

    def refresh_overlay(self) -> None:
        """Push the runs' data and the view settings into the overlay plot (only while it is shown)."""
        if not self.overlay:
            return
        plot = self.query_one(OverlayPlot)
        plot.smooth, plot.x_axis, plot.log_y = self.smooth, self.x_axis, self.log_y
        plot.version = sum(v.run.state.version for v in self.run_views)
        plot.refresh()

    def active_panel(self) -> AlertsPanel | None:
        """The focused alert list, else one with a selection, else the first with alerts."""
        focused = self.focused
        if isinstance(focused, AlertsPanel) and focused.alerts:
            return focused
        panels = list(self.query(AlertsPanel))
        for panel in panels:
            if panel.highlighted is not None and panel.alerts:
                return panel
        for panel in panels:
            if panel.alerts:
                return panel
        return panels[0] if panels else None

    def jump_to(self, alert: Alert) -> None:
        self.jump_step = alert.step

    # -- reactive watchers -----------------------------------------------------------
    def watch_paused(self, paused: bool) -> None:
        self.refresh_runs(force=not paused)

    def watch_jump_step(self, step: int | None) -> None:
        self.refresh_runs()

    def watch_zoom(self, zoom: int | None) -> None:
        self.refresh_runs()

    def watch_log_y(self, log_y: bool) -> None:
        self.refresh_runs()

    def watch_smooth(self, smooth: float) -> None:
        self.refresh_runs()

    def watch_x_axis(self, x_axis: str) -> None:
        self.refresh_runs()

    def watch_overlay(self, overlay: bool) -> None:
        self.query_one("#runs").display = not overlay
        self.query_one(OverlayPlot).display = overlay
        self.refresh_runs()

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for action, title, help_text in self.PALETTE:
            yield SystemCommand(title, help_text, lambda a=action: self.run_action(a))

    # -- actions ---------------------------------------------------------------------
    def action_smoothing(self) -> None:
        """Cycle the plots' EMA strength through SMOOTHING."""
        i = SMOOTHING.index(self.smooth) if self.smooth in SMOOTHING else 0
        self.smooth = SMOOTHING[(i + 1) % len(SMOOTHING)]
        self.notify("smoothing off" if not self.smooth else f"smoothing: EMA {self.smooth:g}", timeout=2)

    def action_overlay(self) -> None:
        self.overlay = not self.overlay

    def action_x_axis(self) -> None:
        self.x_axis = X_AXES[(X_AXES.index(self.x_axis) + 1) % len(X_AXES)]
        self.notify(f"x axis: {self.x_axis}", timeout=2)

    def action_screenshot_svg(self) -> None:
        """Save the screen as SVG next to the first metrics file (``npt-monitor-<step>.svg``)."""
        target = self.paths[0].parent
        step = self.run_views[0].run.state.step if self.run_views else None
        name = f"npt-monitor-step{step if step is not None else 0}.svg"
        saved = self.save_screenshot(filename=name, path=str(target))
        self.notify(f"saved {saved}", timeout=4)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss(None)
        else:
            self.push_screen(HelpScreen(self.config))

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused

    def action_follow(self) -> None:
        self.paused = False
        self.jump_step = None

    def action_jump(self) -> None:
        panel = self.active_panel()
        if panel is None or not panel.alerts:
            self.notify("no alerts yet", timeout=2)
            return
        if panel.highlighted is None:
            panel.highlighted = len(panel.alerts) - 1
        alert = panel.selected_alert
        if alert is not None:
            self.jump_to(alert)

    def action_next_alert(self, delta: int = 1) -> None:
        panel = self.active_panel()
        if panel is None or not panel.alerts:
            self.notify("no alerts yet", timeout=2)
            return
        if panel.highlighted is None:
            panel.highlighted = 0 if delta > 0 else len(panel.alerts) - 1
        else:
            panel.highlighted = max(0, min(len(panel.alerts) - 1, panel.highlighted + delta))
        alert = panel.selected_alert
        if alert is not None:
            self.jump_to(alert)

    def action_toggle_log(self) -> None:
        self.log_y = not self.log_y

    def action_zoom(self) -> None:
        i = self.zooms.index(self.zoom) if self.zoom in self.zooms else -1
        self.zoom = self.zooms[(i + 1) % len(self.zooms)]

    def action_pick_metrics(self) -> None:
        views = self.run_views
        keys = sorted({k for v in views for k in v.state.numeric_keys()})
        if not keys:
            self.notify("no metrics yet", timeout=2)
            return

        def apply(chosen: tuple[str, ...] | None) -> None:
            if chosen is None:
                return
            for v in views:
                v.components = chosen
            self.refresh_runs()

        self.push_screen(MetricPickerScreen(keys, views[0].current_components()), apply)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        panel = event.option_list
        if isinstance(panel, AlertsPanel):
            alert = panel.selected_alert
            if alert is not None:
                self.jump_to(alert)

    def on_unmount(self) -> None:
        for view in self.run_views:
            view.stop()


def make_app(paths: Sequence[str | Path], config: AlertConfig | None = None, **options) -> MonitorApp:
    """Factory used by the CLI and the tests.

    ``options``: ``poll_interval``, ``refresh_interval``, ``zooms``; any
    :class:`AlertConfig` field (e.g. ``kl_threshold=6``) overrides ``config``.
    """
    fields = set(AlertConfig.field_names())
    overrides = {k: options.pop(k) for k in list(options) if k in fields}
    cfg = config or AlertConfig()
    if overrides:
        cfg = replace(cfg, **overrides)
    return MonitorApp(paths, cfg, **options)
