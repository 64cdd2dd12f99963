"""TensorBoard: the sink behind MetricsWriter (``logging.tensorboard``) and ``npt-ds tb``, read back with
TensorBoard's own EventAccumulator and compared exactly with the stream."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from npt_ds.cli import main as npt_ds
from npt_ds.config import ConfigError, load_config
from npt_ds.metrics.tensorboard import scalars
from npt_ds.metrics.writer import MetricsWriter, read_metrics

DEMO = Path(__file__).resolve().parents[1] / "monitor" / "fixtures" / "demo_multi_layer.jsonl"


def read_back(log_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar in the event files under ``log_dir``: {tag: [(step, wall time, value)]}."""
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.wall_time, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def expected(records: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    out: dict[str, list] = {}
    for rec in records:
        for key, value in scalars(rec).items():
            out.setdefault(key, []).append((rec["step"], rec["time"], value))
    return out


def test_scalars_are_the_numbers_of_a_line():
    line = {"time": 1.5, "step": 3, "event": "train", "loss/total": 1 / 3, "tokens": 512, "curriculum/stage": "mixed",
            "flag": True, "missing_ranks": [1], "eta_s": None}
    assert scalars(line) == {"loss/total": 1 / 3, "tokens": 512.0}


def test_the_writer_sink_writes_every_lines_scalars_exactly(tmp_path):
    writer = MetricsWriter(tmp_path, console=False, tensorboard=True)
    writer.log({"step": 0, "event": "start", "run/total_steps": 3, "run/name": "tb"})
    for step in (1, 2, 3):
        writer.log({"step": step, "event": "train", "loss/total": 10 / (step + 2), "grad_norm": 0.1 * step,
                    "curriculum/stage": "teacher", "sys/0/gpu_util": 97.0})
    writer.log({"step": 3, "event": "eval", "eval/ppl_npt": 12.345678901234567})
    writer.close()
    stream = read_metrics(tmp_path / "metrics.jsonl")
    got = read_back(tmp_path / "tb")
    assert got == expected(stream)
    assert got["loss/total"][0] == (1, stream[1]["time"], 10 / 3) and set(got) == {
        "run/total_steps", "loss/total", "grad_norm", "sys/0/gpu_util", "eval/ppl_npt"}


def test_npt_ds_tb_converts_a_real_stream(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DEMO, run / "metrics.jsonl")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 241, "event": "train", "loss/to')  # a half-written last line: skipped with a warning
    assert npt_ds(["tb", str(run)]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in DEMO.read_text().splitlines()]
    got = read_back(run / "tb")
    assert got == expected(records)
    n = sum(len(v) for v in got.values())
    assert out == f"{run / 'tb'}: {n} scalars from {len(records)} lines of {run / 'metrics.jsonl'} " \
                  f"(tensorboard --logdir {run / 'tb'})\n"
    assert err == f"npt-ds tb: warning: {run / 'metrics.jsonl'}:{len(records) + 1}: not a JSON object, skipped\n"
    assert len(got["loss/total"]) == 240 and got["eval/ppl_npt"][0][0] == 0


def test_npt_ds_tb_never_writes_a_second_copy_and_names_the_fix(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DEMO, run / "metrics.jsonl")
    assert npt_ds(["tb", str(run)]) == 0
    before = sorted(p.name for p in (run / "tb").iterdir())
    capsys.readouterr()
    assert npt_ds(["tb", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"npt-ds tb: {run / 'tb'} already holds TensorBoard event files") and "--out" in err
    assert sorted(p.name for p in (run / "tb").iterdir()) == before
    assert npt_ds(["tb", str(run / "metrics.jsonl"), "--out", str(tmp_path / "other")]) == 0
    assert read_back(tmp_path / "other") == read_back(run / "tb")
    assert npt_ds(["tb", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


def without_tensorboard(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))


def test_without_the_package_one_line_names_the_install(tmp_path, monkeypatch, capsys):
    without_tensorboard(monkeypatch)
    shutil.copy(DEMO, tmp_path / "metrics.jsonl")
    assert npt_ds(["tb", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("npt-ds tb: the conversion needs the tensorboard package, which is not installed: "
                                       "pip install 'tensorboard==2.21.0'\n")
    assert not (tmp_path / "tb").exists()
    with pytest.raises(ConfigError, match=r"logging.tensorboard: true needs the tensorboard package.*pip install"):
        MetricsWriter(tmp_path / "w", console=False, tensorboard=True)


def test_training_without_the_package_stops_on_every_rank_before_any_collective(tmp_path, monkeypatch):
    from npt_ds.train import trainer

    without_tensorboard(monkeypatch)
    monkeypatch.setattr(trainer, "init_distributed", lambda *a: pytest.fail("reached the process group"))
    cfg = load_config("configs/tiny_debug.yaml", ["logging.tensorboard=true", f"logging.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="pip install 'tensorboard==2.21.0'"):
        trainer.Trainer(cfg)
