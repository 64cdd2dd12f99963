"""Run header: name, step, stage, mixing ratio, KD weight, tokens/s, ETA, mode."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..formatting import fmt_num, format_eta, format_rate
from ..state import HeaderInfo


class RunHeader(Widget):
    """Shows a :class:`HeaderInfo`; ``mode`` is ``live``, ``paused`` or ``jump``."""

    # repaint-only reactives: a relayout (costly: it repaints every widget) is
    # requested only when the wrapped header changes its number of lines
    info: reactive[HeaderInfo] = reactive(HeaderInfo)
    mode: reactive[str] = reactive("live")
    pending: reactive[int] = reactive(0)  # lines read while paused
    jump_step: reactive[int | None] = reactive(None)
    n_alerts: reactive[int] = reactive(0)
    zoom: reactive[int | None] = reactive(None)  # plotted step span

    _lines = 1

    def _check_height(self) -> None:
        width = self.content_size.width
        if width <= 0:
            return
        text = self.render()
        lines = max(1, len(text.wrap(self.app.console, width)))
        if lines != self._lines:
            self._lines = lines
            self.refresh(layout=True)

    def watch_info(self) -> None:
        self._check_height()

    def watch_mode(self) -> None:
        self._check_height()

    def watch_pending(self) -> None:
        self._check_height()

    def watch_jump_step(self) -> None:
        self._check_height()

    def watch_n_alerts(self) -> None:
        self._check_height()

    def watch_zoom(self) -> None:
        self._check_height()

    def on_resize(self) -> None:
        self._check_height()

    def render(self) -> Text:
        i = self.info
        t = Text(no_wrap=False, overflow="fold")
        t.append(i.name or "run", style="bold")
        if self.mode == "paused":
            extra = f" +{self.pending:,} lines" if self.pending else ""
            t.append(f"  ⏸ PAUSED{extra}", style="bold black on yellow")
        elif self.mode == "jump" and self.jump_step is not None:
            t.append(f"  ⤓ AT STEP {self.jump_step:,} (f: follow)", style="bold black on magenta")
        else:
            t.append("  ● LIVE", style="bold green")
        if i.waiting and not i.lines:
            t.append("  waiting for metrics file…", style="italic yellow")
            return t
        step = "--" if i.step is None else f"{i.step:,}"
        t.append("  step ", style="dim")
        t.append(step, style="bold")
        if i.total_steps:
            t.append(f"/{i.total_steps:,}", style="dim")
            if i.step is not None:
                t.append(f" ({100 * i.step / i.total_steps:.0f}%)", style="dim")
        t.append("  stage ", style="dim")
        t.append(i.stage or "--", style="bold cyan")
        t.append("  mix ", style="dim")
        t.append(fmt_num(i.mixing_ratio, 3))
        t.append("  KD w ", style="dim")
        t.append(fmt_num(i.kd_weight, 3))
        t.append("  ", style="dim")
        t.append(format_rate(i.tokens_per_s))
        t.append(" tok/s", style="dim")
        t.append("  ETA ", style="dim")
        t.append(format_eta(i.eta_s))
        if i.skipped_steps:
            t.append(f"  skipped {i.skipped_steps}", style="bold red")
        if i.corrupt:
            t.append(f"  {i.corrupt} corrupt line{'s' if i.corrupt != 1 else ''}", style="yellow")
        if self.n_alerts:
            t.append(f"  {self.n_alerts} alert{'s' if self.n_alerts != 1 else ''}", style="bold red")
        if self.zoom:
            t.append(f"  zoom {self.zoom:,}", style="dim")
        return t
