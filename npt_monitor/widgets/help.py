"""Keyboard help screen (``?``)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ..alerts import AlertConfig

KEYS = (
    ("?", "show / hide this help"),
    ("q", "quit"),
    ("p", "pause / resume the display (the file is still read)"),
    ("f", "follow: resume live view, plots track the newest steps"),
    ("j / enter", "jump the plots to the step of the selected alert"),
    ("n / N", "select the next / previous alert and jump to it"),
    ("z", "zoom: cycle the plotted step window (whole run, 5000, 1000, 200)"),
    ("l", "log / linear y axis"),
    ("m", "metric picker for the lower plot"),
    ("tab", "move focus (alert list of each run, layer table)"),
)


def help_renderable(cfg: AlertConfig) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for key, what in KEYS:
        grid.add_row(key, what)
    grid.add_row("", "")
    grid.add_row(Text("alerts", style="bold"), "")
    grid.add_row("nonfinite", "a NaN/Inf value on a line")
    grid.add_row("skipped", "nan_step event or skipped_steps went up")
    grid.add_row("kl_high", f"kd/kl > {cfg.kl_threshold:g}")
    bound = f"{cfg.stall_s:g} s" if cfg.stall_s is not None else (
        f"max({cfg.stall_min_s:g} s, {cfg.stall_factor:g}x the median train-line interval); "
        f"{cfg.stall_startup_s:g} s before the first train line")
    grid.add_row("stall", f"no line for longer than {bound}, or an abort event (names the ranks)")
    grid.add_row("grad_spike", f"grad_norm > {cfg.grad_spike_factor:g}x median of last {cfg.grad_spike_window}; "
                               "a note if the loss absorbed it or a stage changed")
    grid.add_row(
        "oscillation",
        f"a periodic swing of the loss (period 4..{cfg.osc_long_window // cfg.osc_min_cycles}, "
        f"{cfg.osc_min_cycles} cycles in the window) >= {cfg.osc_power_ratio:g}x the run's noise floor, "
        f">= {cfg.osc_min_amplitude:.0%} of its level, held for {cfg.osc_persist_cycles:g} more periods",
    )
    grid.add_row("instability", f"the loss swings >= {cfg.instab_min_swing:.0%} of its level around its trend "
                                f"(and >= {cfg.instab_noise_factor:g}x the run's earlier noise), any period or none")
    grid.add_row("plateau", f"mean loss of the last {cfg.plateau_window // 2} steps >= the {cfg.plateau_window // 2} before")
    grid.add_row("straggler", f"slowest rank's step > {cfg.straggler_factor:g}x the median rank's, "
                              f"{cfg.straggler_consecutive} log steps in a row")
    grid.add_row("memory_growth", f"peak memory up >= {cfg.memory_growth_min_rel:.0%} at {cfg.memory_growth_marks} "
                                  "evals/checkpoints in a row")
    grid.add_row("throughput_drop", f"tokens/s < {cfg.throughput_factor:g}x its running median")
    return grid


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", key_display="?"),
    ]

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box") as box:
            box.border_title = "npt-monitor keys"
            box.border_subtitle = "esc / ? to close"
            yield Static(help_renderable(self.cfg))

    def action_dismiss(self, result: None = None) -> None:  # type: ignore[override]
        self.dismiss(None)
