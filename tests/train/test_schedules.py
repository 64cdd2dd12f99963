"""Step schedules: LR, KD warm-up, difficulty keep, and the curriculum parser's boundaries and errors."""
from __future__ import annotations

import math
import re

import pytest

from npt_ds.config import ConfigError
from npt_ds.train.schedules import (Curriculum, CurriculumError, Stage, difficulty_keep_at, kd_weight_at, lr_at,
                              parse_curriculum)

SPEC = "teacher:5000,mixed:3000:0.3,mixed:3000:0.7,student:15000"


def test_lr_warmup_then_cosine_to_floor():
    base, warm, total, floor = 1e-3, 10, 110, 0.1
    assert lr_at(0, base, warm, total, floor) == pytest.approx(1e-4)
    assert lr_at(4, base, warm, total, floor) == pytest.approx(5e-4)
    assert lr_at(10, base, warm, total, floor) == pytest.approx(1e-3)
    mid = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_at(35, base, warm, total, floor) == pytest.approx(mid)
    assert lr_at(60, base, warm, total, floor) == pytest.approx(0.55e-3)
    assert lr_at(110, base, warm, total, floor) == pytest.approx(1e-4)
    assert lr_at(500, base, warm, total, floor) == pytest.approx(1e-4)
    assert lr_at(0, base, 0, total, floor) == pytest.approx(1e-3)


def test_kd_warmup_acceptance_values():
    total = 1000
    got = [kd_weight_at(int(f * total), total, alpha=0.7) for f in (0.0, 0.1, 0.2, 0.5)]
    assert got == pytest.approx([0.1, 0.4, 0.7, 0.7], abs=1e-12)
    assert kd_weight_at(0, total, alpha=0.0) == 0.0
    assert kd_weight_at(0, total, alpha=0.7, warmup_frac=0.0) == 0.7


def test_difficulty_keep_schedule():
    assert [difficulty_keep_at(s, 100) for s in (0, 25, 50, 90)] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    assert difficulty_keep_at(10, 100, start=0.2, ramp_frac=0.2) == pytest.approx(0.6)
    assert difficulty_keep_at(0, 100, ramp_frac=0.0) == 1.0


@pytest.mark.parametrize("step, stage", [
    (0, ("teacher", 0.0)), (4999, ("teacher", 0.0)),
    (5000, ("mixed", 0.3)), (7999, ("mixed", 0.3)),
    (8000, ("mixed", 0.7)), (10999, ("mixed", 0.7)),
    (11000, ("student", 1.0)), (25999, ("student", 1.0)),
    (26000, ("student", 1.0)), (10 ** 9, ("student", 1.0)),
])
def test_curriculum_boundaries(step, stage):
    assert parse_curriculum(SPEC).stage_at(step) == stage


def test_curriculum_structure_roundtrip_and_empty():
    cur = parse_curriculum(SPEC)
    assert cur.stages == (Stage("teacher", 5000, 0.0), Stage("mixed", 3000, 0.3), Stage("mixed", 3000, 0.7),
                          Stage("student", 15000, 1.0))
    assert cur.total_steps == 26000
    assert cur.format() == SPEC and str(cur) == SPEC
    assert parse_curriculum(str(cur)) == cur
    spaced = parse_curriculum(" teacher:10 , mixed:5:1.0,mixed:5:0 ,mixed:2:1e-05")
    assert str(spaced) == "teacher:10,mixed:5:1,mixed:5:0,mixed:2:1e-05"
    assert parse_curriculum(str(spaced)) == spaced
    assert parse_curriculum("") == Curriculum() and str(Curriculum()) == ""
    assert Curriculum().stage_at(123) == ("teacher", 0.0)
    assert parse_curriculum("mixed:10:0.5").stage_at(99) == ("mixed", 0.5)
    assert parse_curriculum("teacher:0,student:5").stage_at(0) == ("student", 1.0)


@pytest.mark.parametrize("text, token, why", [
    ("teacher:10,mixed:100", "mixed:100", "needs a ratio"),
    ("teacher:-5", "teacher:-5", "non-negative integer"),
    ("teacher:1.5", "teacher:1.5", "non-negative integer"),
    ("student:abc", "student:abc", "non-negative integer"),
    ("mixed:10:1.5", "mixed:10:1.5", "must lie in [0, 1]"),
    ("mixed:10:-0.1", "mixed:10:-0.1", "must lie in [0, 1]"),
    ("mixed:10:half", "mixed:10:half", "not a number"),
    ("teacher:5,teachr:10", "teachr:10", "unknown stage"),
    ("teacher:10:0.5", "teacher:10:0.5", "extra fields"),
    ("mixed:10:0.5:1", "mixed:10:0.5:1", "extra fields"),
    ("teacher", "teacher", "expected teacher:STEPS"),
    ("teacher:5,,student:5", "", "unknown stage"),
])
def test_curriculum_errors_name_the_token(text, token, why):
    with pytest.raises(CurriculumError) as info:
        parse_curriculum(text)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    assert "\n" not in message
    assert f"bad stage {token!r}" in message and why in message
    assert message.startswith("schedule.curriculum:")


def test_curriculum_shares_fit_any_run_length():
    spec = "teacher:10%,mixed:20%:0.5,student:70%"
    assert parse_curriculum(spec, 488).stages == (Stage("teacher", 49, 0.0), Stage("mixed", 97, 0.5),
                                                  Stage("student", 342, 1.0))
    assert parse_curriculum(spec, 1953).total_steps == 1953  # the cumulative rounding loses no step
    assert [s.steps for s in parse_curriculum(spec, 10).stages] == [1, 2, 7]
    # steps and shares mix: an absolute stage keeps its length
    assert parse_curriculum("teacher:5,student:50%", 100).stages == (Stage("teacher", 5, 0.0), Stage("student", 50, 1.0))


@pytest.mark.parametrize("text, total, why", [
    ("teacher:10%,student:90%", None, "needs the run's total steps"),
    ("teacher:60%,student:50%", 100, "add up to 110% (> 100%)"),
    ("teacher:ten%", 100, "must be a number of percent"),
    ("teacher:120%", 100, "must lie in [0%, 100%]"),
])
def test_curriculum_share_errors(text, total, why):
    with pytest.raises(CurriculumError, match=re.escape(why)) as info:
        parse_curriculum(text, total)
    assert str(info.value).startswith("schedule.curriculum:") and "\n" not in str(info.value)
