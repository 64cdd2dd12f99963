"""How the monitor writes numbers: compact values, rates and ETAs ('--' for missing, NaN/Inf kept visible)."""
from __future__ import annotations

import math

_isfinite = math.isfinite


def format_eta(seconds: float | None) -> str:
    if seconds is None or not _isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_rate(v: float | None) -> str:
    if v is None or not _isfinite(v):
        return "--"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.0f}"


def fmt_num(v: float | None, digits: int = 4) -> str:
    """Compact number for tables/headers: '--' for missing, 'NaN'/'Inf' kept visible."""
    if v is None:
        return "--"
    if not _isfinite(v):
        return "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{max(1, digits - 2)}e}"
    return f"{v:.{digits}g}"
