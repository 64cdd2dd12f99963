"""The alert engine: every detector over each batch of records, in file order."""
from __future__ import annotations

from typing import Iterable

from ..parsing import Batch
from .base import Alert, AlertConfig, Detector
from .events import AbortDetector, KLDetector, NonFiniteDetector, SkippedStepDetector
from .gradients import GradSpikeDetector
from .loss_shape import InstabilityDetector, OscillationDetector, PlateauDetector
from .system import MemoryGrowthDetector, StragglerDetector, ThroughputDropDetector


class AlertEngine:
    """Runs all detectors over batches in file order."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        self.reset()

    def reset(self) -> None:
        cfg = self.config
        self.detectors: list[Detector] = [
            NonFiniteDetector(cfg),
            SkippedStepDetector(cfg),
            KLDetector(cfg),
            AbortDetector(cfg),
            GradSpikeDetector(cfg),
            OscillationDetector(cfg),
            InstabilityDetector(cfg),
            PlateauDetector(cfg),
            StragglerDetector(cfg),
            MemoryGrowthDetector(cfg),
            ThroughputDropDetector(cfg),
        ]
        self.step: int | None = None

    def feed(self, batch: Batch) -> list[Alert]:
        """Alerts raised by ``batch``, in line order (detector order within a line)."""
        if not len(batch):
            return []
        batch.prepare(self.step)
        if batch.last_step is not None:
            self.step = batch.last_step
        found: list[tuple[int, int, Alert]] = []
        steps, line_nos = batch.steps, batch.line_nos
        assert steps is not None
        for order, det in enumerate(self.detectors):
            for i, msg, *late in det.scan(batch):  # late: (severity, step, line_no) of a delayed verdict
                sev, step, line_no = late if late else (det.severity, steps[i], line_nos[i])
                found.append((i, order, Alert(step, det.kind, sev, msg, line_no)))
        found.sort(key=lambda t: (t[0], t[1]))
        return [a for _, _, a in found]

    def finish(self) -> list[Alert]:
        """Verdicts still waiting for later lines, at the end of a complete file (``--check``)."""
        out = []
        for det in self.detectors:
            finish = getattr(det, "finish", None)
            for sev, msg, step, line_no in (finish() if finish else []):
                out.append(Alert(step, det.kind, sev, msg, line_no))
        return out

    def feed_dicts(self, records: Iterable[dict]) -> list[Alert]:
        """Convenience for tests/scripts: feed plain dicts (one per line)."""
        return self.feed(Batch.from_dicts(records))
