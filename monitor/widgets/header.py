"""Run header: name, step, stage, mixing ratio, KD weight, tokens/s, ETA, mode."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..stream import HeaderInfo, fmt_num, format_eta, format_rate


class RunHeader(Widget):
    """Shows a :class:`HeaderInfo`; ``mode`` is ``live``, ``paused`` or ``jump``."""

    info: reactive[HeaderInfo] = reactive(HeaderInfo, layout=True)
    mode: reactive[str] = reactive("live", layout=True)
    pending: reactive[int] = reactive(0, layout=True)  # lines read while paused
    jump_step: reactive[int | None] = reactive(None, layout=True)
    n_alerts: reactive[int] = reactive(0, layout=True)
    zoom: reactive[int | None] = reactive(None, layout=True)  # plotted step span

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
