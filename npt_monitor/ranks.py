"""Per-rank figures of a run's latest train line, for the ranks/system panel and ``--once``: own step time and
peak memory (``rank/{r}/step_s``, ``rank/{r}/mem_gb``) and the system figures (``sys/{r}/gpu_util``,
``gpu_mem_gb``, ``gpu_power_w``, ``gpu_temp_c`` or ``sys/{r}/cpu_pct``); one row per rank, the slowest
flagged, and in each system column the worst rank."""

from __future__ import annotations

import re
from dataclasses import dataclass

RANK_KEY = re.compile(r"(rank|sys)/(\d+)/(\w+)$")
# system figures: (field, column title, how a value is shown, whether the highest value is the worst);
# the lowest utilisation, power or CPU share is the rank doing the least work (waiting, starved)
SYSTEM = (("gpu_util", "util", "{:.0f}%", False), ("gpu_mem_gb", "gpu", "{:.3g}GB", True),
          ("gpu_power_w", "W", "{:.0f}W", False), ("gpu_temp_c", "°C", "{:.0f}°C", True),
          ("cpu_pct", "cpu", "{:.0f}%", False))


@dataclass(frozen=True)
class RankRow:
    rank: int
    step_s: float | None
    mem_gb: float | None
    slowest: bool
    system: dict[str, float]  # field -> value
    worst: frozenset[str]  # the system fields in which this rank is the worst


def rank_rows(latest: dict[str, float]) -> list[RankRow]:
    """One row per rank, by rank, from the latest values."""
    ranks: dict[int, dict[str, float]] = {}
    system: dict[int, dict[str, float]] = {}
    for key, value in latest.items():
        m = RANK_KEY.match(key)
        if m:
            (ranks if m.group(1) == "rank" else system).setdefault(int(m.group(2)), {})[m.group(3)] = value
            ranks.setdefault(int(m.group(2)), {})
    worst: dict[int, set[str]] = {}
    for field, _, _, high in SYSTEM:
        have = {r: v[field] for r, v in system.items() if field in v}
        if len(have) >= 2 and len(set(have.values())) > 1:
            worst.setdefault((max if high else min)(have, key=have.__getitem__), set()).add(field)
    slowest = latest.get("time/slowest_rank")
    return [RankRow(r, v.get("step_s"), v.get("mem_gb"), slowest is not None and int(slowest) == r,
                    system.get(r, {}), frozenset(worst.get(r, ()))) for r, v in sorted(ranks.items())]


def system_columns(rows: list[RankRow]) -> list[tuple[str, str, str]]:
    """(field, title, format) of the system figures any rank has, in :data:`SYSTEM` order."""
    present = set().union(*(row.system for row in rows)) if rows else set()
    return [(field, title, fmt) for field, title, fmt, _ in SYSTEM if field in present]


def system_line(latest: dict[str, float]) -> str:
    """One line: step time (rank 0 wall / slowest / median), peak memory, TFLOP/s and MFU."""
    return "  ".join(system_parts(latest))


def system_parts(latest: dict[str, float]) -> list[str]:
    """The pieces of :func:`system_line` (the panel shows one per line)."""
    parts = []
    if "time/step_s" in latest:
        parts.append(f"step {latest['time/step_s']:.3g}s")
    if "time/step_max_s" in latest and "time/step_median_s" in latest:
        parts.append(f"slowest r{int(latest.get('time/slowest_rank', 0))} {latest['time/step_max_s']:.3g}s "
                     f"(median {latest['time/step_median_s']:.3g}s)")
    if "mem/peak_alloc_gb" in latest:
        parts.append(f"peak mem {latest['mem/peak_alloc_gb']:.3g} GB (r{int(latest.get('mem/peak_rank', 0))})")
    if "perf/tflops_per_device" in latest:
        parts.append(f"{latest['perf/tflops_per_device']:.3g} TFLOP/s/dev")
    if "perf/mfu" in latest:
        parts.append(f"MFU {latest['perf/mfu']:.1%}")
    return parts
