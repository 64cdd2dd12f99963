"""Per-rank figures of a run's latest train line (``rank/{r}/step_s``, ``rank/{r}/mem_gb``), for the ranks
panel and ``--once``: one row per rank, the slowest flagged."""

from __future__ import annotations

import re

RANK_KEY = re.compile(r"rank/(\d+)/(step_s|mem_gb)$")


def rank_rows(latest: dict[str, float]) -> list[tuple[int, float | None, float | None, bool]]:
    """[(rank, own step s, peak memory GB, is the slowest)] from the latest values, by rank."""
    ranks: dict[int, dict[str, float]] = {}
    for key, value in latest.items():
        m = RANK_KEY.match(key)
        if m:
            ranks.setdefault(int(m.group(1)), {})[m.group(2)] = value
    slowest = latest.get("time/slowest_rank")
    return [(r, v.get("step_s"), v.get("mem_gb"), slowest is not None and int(slowest) == r)
            for r, v in sorted(ranks.items())]


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
