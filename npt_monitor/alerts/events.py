"""Alerts on single lines: a non-finite value, a skipped step, KL above its limit."""
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
