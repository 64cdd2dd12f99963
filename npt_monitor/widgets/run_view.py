"""One run's column: header, loss plot, component plot, layer table, alerts.

Owns the :class:`~npt_monitor.run.Run` model and its tailer thread.  The thread
posts :class:`~npt_monitor.messages.TailUpdate` messages; they are folded into the
model here (on the UI thread) and the widgets are refreshed on a timer, at most
every ``refresh_interval`` seconds, unless the app is paused.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical

from ..alerts import Alert, AlertConfig
from ..messages import TailUpdate
from ..run import Run
from ..tailer import TailBatch, TailerThread
from .alerts_panel import AlertsPanel
from .header import RunHeader
from .layers import LayerTable
from .plot import MetricPlot
from .ranks_panel import TITLE as RANKS_TITLE, RanksPanel

DEFAULT_JUMP_SPAN = 200
LOADING_PLOT_INTERVAL = 1.0
PLOT_EVERY_REFRESHES = 8  # while tailing, plots redraw every 8th refresh tick at most (2 s by default)
STALL_CHECK_S = 1.0  # how often the silence of the run is judged


def default_components(keys: list[str]) -> tuple[str, ...]:
    """Loss components (everything under ``loss/`` except the total)."""
    return tuple(k for k in keys if k.startswith("loss/") and k != "loss/total")


class RunView(Vertical):
    def __init__(
        self,
        path: str | Path,
        config: AlertConfig | None = None,
        poll_interval: float = 0.2,
        refresh_interval: float = 0.25,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.run = Run(path, config)
        self.poll_interval = poll_interval
        self.refresh_interval = refresh_interval
        self.plot_interval = PLOT_EVERY_REFRESHES * refresh_interval
        self.tailer: TailerThread | None = None
        self.components: tuple[str, ...] | None = None  # None: default_components
        self._shown_version = -1
        self._shown_lines = 0
        self._shown_view: tuple | None = None
        self.n_batches = 0
        self.loaded_once = False  # the file as found at start is read: later error alerts are news
        # a big backlog is being read: plots refresh at most every LOADING_PLOT_INTERVAL
        # (not ``loading``: that is Textual's reactive that covers the widget with a spinner)
        self.backlog = False
        self._last_full = 0.0

    # -- composition ---------------------------------------------------------------
    def compose(self) -> ComposeResult:
        state = self.run.state
        yield RunHeader()
        yield MetricPlot(state, ("loss/total",), classes="loss-plot")
        yield MetricPlot(state, (), classes="components-plot")
        with Horizontal(classes="bottom"):
            yield LayerTable()
            yield RanksPanel()
            yield AlertsPanel()

    def on_mount(self) -> None:
        self.query_one(".loss-plot", MetricPlot).border_title = "total loss"
        self.query_one(".components-plot", MetricPlot).border_title = "components (m: pick)"
        self.query_one(LayerTable).border_title = "layers"
        self.query_one(RanksPanel).border_title = RANKS_TITLE
        self.query_one(RanksPanel).display = False
        self.query_one(AlertsPanel).border_title = "Alerts (0)"
        self.query_one(RunHeader).info = self.run.state.header(waiting=True)
        self.tailer = TailerThread(self.run.path, self._from_thread, interval=self.poll_interval)
        self.tailer.start()
        self.set_interval(self.refresh_interval, self.refresh_view)
        self.set_interval(STALL_CHECK_S, self.check_stall)

    def on_unmount(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self.tailer is not None:
            self.tailer.stop()

    # -- data ----------------------------------------------------------------------
    def _from_thread(self, batch: TailBatch) -> None:
        """Runs in the tailer thread: only posts a message."""
        if not self.post_message(TailUpdate(batch)) and self.tailer is not None:
            self.tailer.done()

    def on_tail_update(self, message: TailUpdate) -> None:
        message.stop()
        try:
            batch = message.batch
            new = self.run.apply(batch)
            self.n_batches += 1
            if self.loaded_once:
                self.announce([a for a in new if a.severity == "error"])
            finished = self.backlog and not batch.more
            self.backlog = batch.more
            self.loaded_once = self.loaded_once or not batch.more
            if batch.reset:
                self.notify(f"{self.run.path.name} was {batch.reason}: reloaded", severity="warning", timeout=4)
            if finished or self.n_batches == 1:
                self._last_full = 0.0  # not throttled: the plots show it too
                self.refresh_view()  # the first data / the whole backlog: show it now, not at the next tick
        finally:
            if self.tailer is not None:
                self.tailer.done()

    def check_stall(self) -> None:
        """A run silent for longer than its bound (once the file as found is read): the ``stall`` error alert,
        announced like any new error."""
        if not self.loaded_once:
            return
        try:
            mtime: float | None = os.stat(self.run.path).st_mtime
        except OSError:
            mtime = None
        alert = self.run.check_stall(time.time(), mtime)
        if alert is not None:
            self.announce([alert])

    def announce(self, errors: list) -> None:
        """New error alerts (not the ones already in the file at start): a notification and the bell."""
        if not errors:
            return
        first = errors[0]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        self.notify(f"{self.run.state.display_name}: {first.format()}{more}", severity="error", timeout=8)
        if getattr(self.app, "bell_on_error", False):
            self.app.bell()

    # -- view ----------------------------------------------------------------------
    @property
    def state(self):
        return self.run.state

    def current_components(self) -> tuple[str, ...]:
        if self.components is not None:
            return self.components
        return default_components(self.run.state.numeric_keys())

    def x_range(self) -> tuple[float, float] | None:
        app = self.app
        zoom = getattr(app, "zoom", None)
        jump = getattr(app, "jump_step", None)
        if jump is not None:
            span = zoom or DEFAULT_JUMP_SPAN
            return (jump - span / 2, jump + span / 2)
        if zoom and self.run.state.step is not None:
            last = self.run.state.step
            return (max(0, last - zoom), max(last, zoom))
        return None

    def refresh_view(self, force: bool = False) -> None:
        """Push the model into the widgets (skipped while the app is paused)."""
        app = self.app
        paused = getattr(app, "paused", False)
        jump = getattr(app, "jump_step", None)
        header = self.query_one(RunHeader)
        header.mode = "paused" if paused else ("jump" if jump is not None else "live")
        paused = paused and not force  # a forced refresh (jump, zoom) shows current data even when paused
        header.jump_step = jump
        header.zoom = getattr(app, "zoom", None)
        state = self.run.state
        if paused:
            header.pending = max(0, state.n_lines - self._shown_lines)
            return
        header.pending = 0
        view = (self.x_range(), jump, self.current_components(), getattr(app, "log_y", False),
                getattr(app, "smooth", 0.0), getattr(app, "x_axis", "step"))
        if state.version == self._shown_version and view == self._shown_view:
            return
        same_view = view == self._shown_view
        self._shown_version = state.version
        self._shown_lines = state.n_lines
        self._shown_view = view
        header.info = state.header(waiting=not self.run.exists)
        header.n_alerts = len(self.run.alerts)
        self.query_one(AlertsPanel).sync(self.run.alerts, self.run.dropped_alerts)  # not throttled: alerts are news
        now = time.monotonic()
        # plots and table redraw at most once per plot_interval while new lines arrive (the monitor's CPU
        # cost while tailing), at once when the view changed (a key press)
        wait = LOADING_PLOT_INTERVAL if self.backlog else (self.plot_interval if same_view else 0.0)
        if not force and now - self._last_full < wait:
            self._shown_version = -1  # header is current; plots/table catch up later
            return
        self._last_full = now
        x_range, marker, components, log_y, smooth, x_axis = view
        for plot in self.query(MetricPlot):
            if plot.has_class("components-plot"):
                plot.metrics = components
            plot.x_range = x_range
            plot.marker = marker
            plot.log_y = log_y
            plot.smooth = smooth
            plot.x_axis = x_axis
            plot.version = state.version
        self.query_one(LayerTable).show_layers(state.layers())
        self.query_one(RanksPanel).show(state.latest)

    def selected_alert(self) -> Alert | None:
        return self.query_one(AlertsPanel).selected_alert
