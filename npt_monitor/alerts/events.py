"""Alerts on single lines: a non-finite value, a skipped step, KL above its limit, a run aborted by its watchdog."""
from __future__ import annotations

import math

from ..parsing import Batch
from .base import ERROR, AlertConfig, Detector, Hits, fmt_value

_isfinite = math.isfinite



class NonFiniteDetector(Detector):
    kind, severity = "nonfinite", ERROR

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        ignore = self.cfg.nonfinite_ignore
        for i in batch.maybe_nonfinite:
            bad = [k for k in batch.nonfinite_keys(i) if k not in ignore]
            if bad:
                rec = batch.records[i]
                shown = ", ".join(f"{k}={fmt_value(rec[k])}" for k in bad[:4])
                more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
                hits.append((i, f"non-finite {shown}{more}"))
        return hits


class SkippedStepDetector(Detector):
    kind, severity = "skipped", ERROR

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.last = 0.0

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        events = batch.events
        for i, v in enumerate(batch.column("skipped_steps")):
            went_up = False
            if (type(v) is int or type(v) is float) and _isfinite(v):
                went_up = v > self.last
                self.last = v
            if went_up or events[i] == "nan_step":
                count = f", skipped_steps={int(self.last)}" if self.last else ""
                why = "nan_step event" if events[i] == "nan_step" else "skipped_steps increased"
                hits.append((i, f"step skipped ({why}{count})"))
        return hits


class KLDetector(Detector):
    kind, severity = "kl_high", ERROR

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.active = False

    def scan(self, batch: Batch) -> Hits:
        hits: Hits = []
        limit = self.cfg.kl_threshold
        for i, kl in enumerate(batch.column(self.cfg.kl_key)):
            if (type(kl) is not float and type(kl) is not int) or not _isfinite(kl):
                continue
            if kl > limit:
                if not self.active:
                    self.active = True
                    hits.append((i, f"KL {fmt_value(kl)} > {limit:g}"))
            else:
                self.active = False
        return hits


class AbortDetector(Detector):
    """An ``abort`` event (a lost or stalled rank ended the run): the ``stall`` alert, naming the ranks."""

    kind, severity = "stall", ERROR

    def scan(self, batch: Batch) -> Hits:
        if "abort" not in batch.events:  # (a C-speed scan: nearly every batch)
            return []
        return [(i, abort_message(batch.records[i])) for i, e in enumerate(batch.events) if e == "abort"]


def abort_message(rec: dict) -> str:
    """``run aborted (stalled): rank 1 missing (rank 1 at step 35, forward); RuntimeError: ...``."""
    reason = rec.get("reason")
    missing = rec.get("missing_ranks")
    steps = rec.get("rank_steps") if type(rec.get("rank_steps")) is dict else {}
    phases = rec.get("rank_phases") if type(rec.get("rank_phases")) is dict else {}
    if type(missing) is list and missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} missing"
        named = [str(r) for r in missing]
    else:
        who = "no rank named" if type(missing) is list else "missing ranks unknown"
        named = sorted(set(steps) | set(phases), key=lambda r: (len(r), r))
    where = []
    for r in named:
        at = [f"at step {steps[r]}"] if r in steps else []
        at += [str(phases[r])] if r in phases else []
        if at:
            where.append(f"rank {r} {', '.join(at)}")
    detail = f" ({'; '.join(where)})" if where else ""
    error = f"; {rec['error']}" if rec.get("error") else ""
    return f"run aborted{f' ({reason})' if reason else ''}: {who}{detail}{error}"
