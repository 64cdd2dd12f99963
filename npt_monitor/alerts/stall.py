"""A stalled run: no line of any kind for longer than the run's own bound (a hung collective, a stuck
filesystem).  Judged against the clock, not the stream's content: the app asks every second, ``--check --stall``
once at the end.  What the bound is, exactly, is in ``docs/alerts.md``."""
from __future__ import annotations

from ..formatting import format_eta
from ..state import RunState
from .base import ERROR, Alert, AlertConfig

KIND = "stall"


def stall_bound(cfg: AlertConfig, state: RunState) -> float:
    """Seconds of silence that make a stall: ``stall_s`` when set; before the first train line
    ``stall_startup_s``; after it max(``stall_min_s``, ``stall_factor`` x the median interval between train lines)."""
    if cfg.stall_s is not None:
        return cfg.stall_s
    if not state.train_seen:
        return cfg.stall_startup_s
    return max(cfg.stall_min_s, cfg.stall_factor * (state.median_train_gap() or 0.0))


def silence(state: RunState, now: float, mtime: float | None) -> float | None:
    """Seconds since the run last wrote: from the later of the newest line's ``time`` and the file's
    modification time (``None``: neither is known)."""
    marks = [t for t in (state.last_line_time, mtime) if t is not None]
    return now - max(marks) if marks else None


def stall_alert(cfg: AlertConfig, state: RunState, now: float, mtime: float | None) -> Alert | None:
    """The stall alert if the run is silent for longer than its bound now and has not ended, else ``None``."""
    if state.ended:
        return None
    quiet = silence(state, now, mtime)
    bound = stall_bound(cfg, state)
    if quiet is None or quiet <= bound:
        return None
    where = (f"last step {state.step}, last event {state.last_event}" if state.last_event is not None
             else "no line yet")
    phase = f" ({state.last_phase})" if state.last_phase else ""
    before = "" if state.train_seen or cfg.stall_s is not None else ", before the first train line"
    return Alert(state.step or 0, KIND, ERROR,
                 f"no line for {format_eta(quiet)} (bound {format_eta(bound)}{before}): {where}{phase}",
                 state.n_lines)
