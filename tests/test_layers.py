"""The layers contract (import-linter, configured in pyproject.toml): the rooms of npt_ds point one way,
npt_monitor imports nothing from npt_ds, and no two sibling modules import each other, at any depth."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
ROOMS = "npt_ds rooms point one way"
MONITOR_ALONE = "npt_monitor reads the metric stream only: no npt_ds import"
NO_CIRCLES = "no import circles between sibling modules, at any depth"


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the packages under `root` (found there first: PYTHONPATH before the editable install)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache", "--no-logo"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (ROOMS, MONITOR_ALONE, NO_CIRCLES):
        assert f"{name} KEPT" in proc.stdout
    assert "3 kept, 0 broken" in proc.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for package in ("npt_ds", "npt_monitor"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, planted, broken", [
    ("npt_ds/model/fused.py", "from ..train import losses", ROOMS),  # the model room reaching up into training
    ("npt_ds/planning/shape.py", "from ..parallel import devices", ROOMS),  # planning sits below parallel
    ("npt_monitor/state.py", "import npt_ds.config", MONITOR_ALONE),
    ("npt_ds/parallel/devices.py", "from . import ds_config", NO_CIRCLES),  # ds_config imports devices
])
def test_a_planted_import_breaks_its_contract(tree_copy, module, planted, broken):
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by the test\n")
    proc = lint(tree_copy)
    assert proc.returncode == 1, proc.stdout
    assert f"{broken} BROKEN" in proc.stdout
    assert Path(module).stem in proc.stdout.split(f"{broken} BROKEN")[-1]  # the report names the importer
