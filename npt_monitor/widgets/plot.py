"""Line plot of one or more metric series, drawn with plotext (braille markers).

The series are downsampled to about two points per column (min/max per bucket)
before plotting, so a 100k-step run costs the same as a short one.  ``x_range``
selects the visible steps (``None``: everything); ``marker`` draws a vertical
line at a step (the selected alert); ``log_y`` uses a log y axis when all the
plotted values are positive; ``smooth`` (an EMA factor, 0 = off) draws the EMA of each
series over its raw line, which stays faint underneath; ``x_axis`` plots against ``step``, wall
``time`` (seconds since the first timed line, from each line's ``time``) or ``tokens`` (the ``tokens``
counter), mapped from steps by linear interpolation.
"""

from __future__ import annotations

import math

import numpy as np
import plotext as plt
from plotext._primitives.marker import marker as marker_class
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..formatting import fmt_num
from ..state import RunState

# plotext's "simple" theme colors signals in this order (256-colour codes)
PALETTE = (12, 10, 9, 14, 13, 11, 1, 2, 3, 4, 5, 6)
FAINT = 240  # the raw line under a smoothed one


def ema(ys: list[float], alpha: float) -> list[float]:
    """Exponential moving average ``s_t = a·y_t + (1-a)·s_{t-1}``, starting at the first value."""
    out, s = [], None
    for y in ys:
        s = y if s is None else alpha * y + (1.0 - alpha) * s
        out.append(s)
    return out
plt.terminal.limit(False, False)  # size comes from the widget, not the terminal


def step_ticks(x0: float, x1: float, width: int) -> tuple[list[float], list[str]]:
    """Round step numbers for the x axis, about one label per 12 columns."""
    span = x1 - x0
    if not math.isfinite(span) or span <= 0:
        return [x0], [_step_label(x0)]
    raw = span / max(1, width // 12)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(1, step)
    first = math.ceil(x0 / step) * step
    pos = []
    v = first
    while v <= x1 + 1e-9:
        pos.append(v)
        v += step
    return pos, [_step_label(p) for p in pos]


def _step_label(v: float) -> str:
    if abs(v) >= 1_000_000:
        return f"{v / 1e6:g}M"
    if abs(v) >= 10_000:
        return f"{v / 1e3:g}k"
    return f"{int(round(v))}"


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Decade ticks (1e-3, 1e-2, ...) inside [lo, hi]; the ends when fewer than two fit."""
    e0, e1 = math.ceil(math.log10(lo)), math.floor(math.log10(hi))
    pos = [10.0**e for e in range(e0, e1 + 1)]
    if len(pos) > 8:
        step = math.ceil(len(pos) / 8)
        pos = pos[::step]
    if len(pos) < 2:
        pos = sorted({lo, hi, *pos})
        return pos, [fmt_num(p, 2) for p in pos]
    return pos, [f"1e{round(math.log10(p))}" for p in pos]


X_AXES = ("step", "time", "tokens")


def x_mapper(state: RunState, x_axis: str):
    """steps -> x values of `x_axis` (None: plot against steps, or the run lacks that axis's data)."""
    if x_axis == "step":
        return None
    src = state.clock if x_axis == "time" else state.series.get("tokens")
    if src is None or len(src) < 2:
        return None
    sx, sy = np.frombuffer(src.xs, dtype=float), np.frombuffer(src.ys, dtype=float)
    base = sy[0] if x_axis == "time" else 0.0
    return lambda xs: (np.interp(np.asarray(xs, dtype=float), sx, sy) - base).tolist()


def _time_label(v: float) -> str:
    v = int(round(v))
    return f"{v // 3600}h{(v % 3600) // 60:02d}" if v >= 3600 else (f"{v // 60}m{v % 60:02d}" if v >= 60 else f"{v}s")


def render_plot(
    state: RunState,
    metrics: tuple[str, ...],
    width: int,
    height: int,
    x_range: tuple[float, float] | None = None,
    marker: float | None = None,
    log_y: bool = False,
    smooth: float = 0.0,
    x_axis: str = "step",
    overlay: list[tuple[str, RunState]] | None = None,
) -> tuple[str | None, list[tuple[str, int, float | None]]]:
    """Build the plot as an ANSI string; also return the legend (name, colour, latest).

    ``overlay``: [(label, state)] of several runs, each drawing ``metrics[0]`` in its run's fixed colour
    (PALETTE in run order; a run without the metric still takes its colour slot).
    """
    fig = plt.figure
    fig.clear()
    fig.theme("simple")
    fig.plot_size(max(10, width), max(4, height))
    x0, x1 = x_range if x_range else (None, None)
    to_x = x_mapper(state, x_axis)
    if overlay:
        lines = [(label, st.series.get(metrics[0]), x_mapper(st, x_axis)) for label, st in overlay]
    else:
        lines = [(name, state.series.get(name), to_x) for name in metrics]
    legend: list[tuple[str, int, float | None]] = []
    drawn = 0
    lo, hi = math.inf, -math.inf
    y_lo, y_hi = math.inf, -math.inf
    for name, series, line_x in lines:
        if series is None:
            if overlay:  # keep the run's colour slot
                legend.append((name, PALETTE[drawn % len(PALETTE)], None))
                fig.draw(fig.signal([math.nan], [math.nan], marker="braille"))
                drawn += 1
            continue
        xs, ys = series.window(x0, x1, max_points=max(8, 2 * width))
        if line_x is not None and xs:
            xs = line_x(xs)
        colour = PALETTE[drawn % len(PALETTE)]
        legend.append((name, colour, series.last_y))
        if not xs:
            drawn += 1
            fig.draw(fig.signal([math.nan], [math.nan], marker="braille"))
            continue
        if smooth > 0:  # raw line in FAINT (its own marker: the theme's colour cycle is not advanced)
            faint = marker_class("braille")._set_pixel(plt.pixel(foreground=FAINT))
            fig.draw(fig.signal(xs, ys, marker=faint).lines(True))
            fig.draw(fig.signal(xs, ema(list(ys), smooth), marker="braille").lines(True))
        else:
            fig.draw(fig.signal(xs, ys, marker="braille").lines(True))
        lo, hi = min(lo, xs[0]), max(hi, xs[-1])
        y_lo, y_hi = min(y_lo, min(ys)), max(y_hi, max(ys))
        drawn += 1
    if not legend:
        return None, legend
    fig.legend(False)
    if x_range:
        lo, hi = to_x(list(x_range)) if to_x is not None else x_range
        fig.ruler("x").lim(lo, hi)
    if lo <= hi:
        pos, labels = step_ticks(lo, hi, width)
        if to_x is not None and x_axis == "time":
            labels = [_time_label(p) for p in pos]
        fig.ruler("x").ticks(pos, labels)
    if log_y and 0 < y_lo <= y_hi:  # log scale only makes sense for positive data
        fig.ruler("y").scale("log")
        fig.ruler("y").ticks(*log_ticks(y_lo, y_hi))
    if marker is not None:
        marker = to_x([marker])[0] if to_x is not None else marker
        fig.line(marker, orientation=1, pixel=plt.pixel(foreground=13))
    return fig.build().string(), legend


class OverlayPlot(Widget):
    """``metric`` of every run in one plot, one fixed colour per run (the app's ``o`` key)."""

    metric: reactive[str] = reactive("loss/total")
    version: reactive[int] = reactive(0)
    smooth: reactive[float] = reactive(0.0)
    x_axis: reactive[str] = reactive("step")
    log_y: reactive[bool] = reactive(False)

    def __init__(self, runs: list[tuple[str, RunState]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.runs = runs

    def render(self) -> Text:
        width, height = self.content_size
        if width < 12 or height < 5:
            return Text("")
        plot, legend = render_plot(self.runs[0][1], (self.metric,), width, height - 1, log_y=self.log_y,
                                   smooth=self.smooth, x_axis=self.x_axis, overlay=self.runs)
        if plot is None:
            return Text(f"waiting for {self.metric}…", style="dim italic")
        return Text("\n", no_wrap=True).join([legend_text(legend, width), Text.from_ansi(plot, no_wrap=True)])


def legend_text(legend: list[tuple[str, int, float | None]], width: int) -> Text:
    head = Text(no_wrap=True, overflow="ellipsis")
    for name, colour, last in legend:
        head.append("━ ", style=Style(color=Color.from_ansi(colour)))
        head.append(name)
        head.append(f" {fmt_num(last)}  ", style="dim")
    head.truncate(width, overflow="ellipsis")
    return head


class MetricPlot(Widget):
    """Plot of ``metrics`` from a :class:`RunState` (set ``state`` before mounting)."""

    metrics: reactive[tuple[str, ...]] = reactive(tuple)
    x_range: reactive[tuple[float, float] | None] = reactive(None)
    marker: reactive[int | None] = reactive(None)
    version: reactive[int] = reactive(0)
    log_y: reactive[bool] = reactive(False)
    smooth: reactive[float] = reactive(0.0)
    x_axis: reactive[str] = reactive("step")

    def __init__(self, state: RunState, metrics: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.set_reactive(MetricPlot.metrics, tuple(metrics))
        self._cache_key: tuple | None = None
        self._cache: Text | None = None

    def render(self) -> Text:
        width, height = self.content_size
        key = (self.version, self.metrics, self.x_range, self.marker, self.log_y, self.smooth, self.x_axis, width, height)
        if key == self._cache_key and self._cache is not None:
            return self._cache
        text = self._build(width, height)
        self._cache_key, self._cache = key, text
        return text

    def _build(self, width: int, height: int) -> Text:
        if not self.metrics:
            return Text("no metric selected (press m)", style="dim italic")
        if width < 12 or height < 5:
            return Text("")
        plot, legend = render_plot(
            self.state, self.metrics, width, height - 1, self.x_range, self.marker, self.log_y, self.smooth, self.x_axis
        )
        if plot is None:
            return Text(f"waiting for {', '.join(self.metrics)}…", style="dim italic")
        head = legend_text(legend, width)
        body = Text.from_ansi(plot, no_wrap=True)
        body.rstrip()
        return Text("\n", no_wrap=True).join([head, body])
