"""Pure functions of the training step: LR, teacher→student curriculum, KD warm-up, difficulty keep.

Nothing here holds state; every value is recomputed from ``step`` (0-based optimizer step), so a
resumed run lands on exactly the same schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError

STAGE_RATIOS = {"teacher": 0.0, "student": 1.0}  # fixed mixing ratio of the non-"mixed" stages


class CurriculumError(ConfigError):
    """A ``schedule.curriculum`` string is malformed; the message names the bad token."""


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * base_lr``.

    Warm-up: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (never 0, reaches
    ``base_lr`` at the first post-warm-up step).  Then with ``p = (step - warmup) / (total - warmup)``
    clamped to [0, 1]: ``base_lr * (m + (1 - m) * (1 + cos(pi p)) / 2)``; steps past the end stay at
    the floor.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def kd_weight_at(step: int, total_steps: int, alpha: float, start: float = 0.1, warmup_frac: float = 0.2) -> float:
    """KD weight: linear from ``start`` at step 0 to ``alpha`` at ``warmup_frac * total_steps``, then ``alpha``.

    ``alpha == 0`` means KD is off and always gives 0 (no warm-up floor).
    """
    if alpha == 0.0:
        return 0.0
    warm = warmup_frac * total_steps
    if step >= warm:
        return alpha
    return start + (alpha - start) * step / warm


def difficulty_keep_at(step: int, total_steps: int, start: float = 0.5, ramp_frac: float = 0.5) -> float:
    """Fraction of tokens the difficulty curriculum keeps in the direct loss (1 = all).

    Linear from ``start`` at step 0 to 1.0 at ``ramp_frac * total_steps``, then 1.0.  The loss keeps
    the easiest ``ceil(keep * N)`` tokens (see :func:`npt_ds.train.losses.difficulty_token_weights`).
    """
    ramp = ramp_frac * total_steps
    if step >= ramp:
        return 1.0
    return start + (1.0 - start) * step / ramp


@dataclass(frozen=True)
class Stage:
    name: str  # teacher | mixed | student
    steps: int
    ratio: float  # student mixing ratio: 0 = pure teacher stream, 1 = pure student stream

    def format(self) -> str:
        if self.name != "mixed":
            return f"{self.name}:{self.steps}"
        text = repr(float(self.ratio))
        return f"mixed:{self.steps}:{text[:-2] if text.endswith('.0') else text}"


@dataclass(frozen=True)
class Curriculum:
    """Consecutive stages; stage k covers steps ``[start_k, start_k + steps_k)``.

    Steps past the last stage stay in the last stage; no stages means teacher throughout.
    """

    stages: tuple[Stage, ...] = ()

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[str, float]:
        """``(stage name, student mixing ratio)`` in effect at ``step``."""
        if not self.stages:
            return "teacher", 0.0
        end = 0
        for stage in self.stages:
            end += stage.steps
            if step < end:
                return stage.name, stage.ratio
        last = self.stages[-1]
        return last.name, last.ratio

    def format(self) -> str:
        return ",".join(s.format() for s in self.stages)

    def __str__(self) -> str:
        return self.format()


def parse_curriculum(text: str, total_steps: int | None = None) -> Curriculum:
    """Parse ``"teacher:5000,mixed:3000:0.3,student:15000"``; ``""`` gives teacher throughout.

    A stage length may be a share of the run instead, ``"teacher:10%,mixed:20%:0.5,student:70%"``, so one
    curriculum fits runs of any length (needs ``total_steps``): stage k ends at step
    round(total_steps · (p_1 + … + p_k) / 100).
    """
    if not text.strip():
        return Curriculum()
    parsed = [_parse_stage(token.strip(), total_steps is not None) for token in text.split(",")]
    stages, cum_pct, end = [], 0.0, 0
    for stage, pct in parsed:
        if pct is None:
            stages.append(stage)
            continue
        cum_pct += pct
        if cum_pct > 100.0 + 1e-9:
            raise CurriculumError(f"schedule.curriculum: the stage shares add up to {cum_pct:g}% (> 100%)")
        new_end = round(total_steps * cum_pct / 100.0)
        stages.append(Stage(stage.name, new_end - end, stage.ratio))
        end = new_end
    return Curriculum(tuple(stages))


def _parse_stage(token: str, shares_allowed: bool = False) -> tuple[Stage, float | None]:
    """One stage and, for a length written as a share (``10%``), the share in percent (else None)."""
    def bad(why: str) -> CurriculumError:
        return CurriculumError(f"schedule.curriculum: bad stage {token!r}: {why}")

    fields = [f.strip() for f in token.split(":")]
    name = fields[0]
    if name not in ("teacher", "mixed", "student"):
        raise bad("unknown stage name; use teacher:N, mixed:N:RATIO or student:N")
    form = "mixed:STEPS:RATIO" if name == "mixed" else f"{name}:STEPS"
    want = form.count(":") + 1
    if len(fields) < want:
        raise bad("mixed needs a ratio, e.g. mixed:1000:0.5" if len(fields) == 2 else f"expected {form}")
    if len(fields) > want:
        raise bad(f"extra fields; expected {form}")
    length, pct = fields[1], None
    if length.endswith("%"):
        if not shares_allowed:
            raise bad("a share of the run (N%) needs the run's total steps")
        try:
            pct = float(length[:-1])
        except ValueError:
            raise bad(f"share {length!r} must be a number of percent such as 10%") from None
        if not 0.0 <= pct <= 100.0:
            raise bad(f"share {length!r} must lie in [0%, 100%]")
        length = "0"
    if not (length.isascii() and length.isdigit()):
        raise bad(f"steps {length!r} must be a non-negative integer or a share such as 10%")
    if name != "mixed":
        return Stage(name, int(length), STAGE_RATIOS[name]), pct
    try:
        ratio = float(fields[2])
    except ValueError:
        raise bad(f"ratio {fields[2]!r} is not a number in [0, 1]") from None
    if not 0.0 <= ratio <= 1.0:
        raise bad(f"ratio {fields[2]!r} must lie in [0, 1]")
    return Stage(name, int(length), ratio), pct
