"""The training loop in one process (ZeRO-3 on CPU): golden losses, NaN handling, run-dir safety, metrics, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from npt_ds.config import ConfigError, load_config
from npt_ds.metrics.writer import MetricsWriter, read_metrics

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "train" / "golden" / "tiny_debug_losses.json"


def make_trainer(run_dir, *overrides):
    from npt_ds.train.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny_debug.yaml",
                      [f"logging.run_dir={run_dir}", "logging.console=false", *overrides])
    return Trainer(cfg)


def run(run_dir, *overrides):
    trainer = make_trainer(run_dir, *overrides)
    try:
        trainer.train()
    finally:
        trainer.close()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_golden_losses_and_metric_stream(tmp_path):
    rows = run(tmp_path, "schedule.total_steps=20", "checkpoint.every=0")
    train = [r for r in rows if r["event"] == "train"]
    losses = [round(r["loss/total"], 7) for r in train]
    if not GOLDEN.exists():  # first run on a new reference: write it, and fail so it gets reviewed
        GOLDEN.write_text(json.dumps(losses, indent=1))
        pytest.fail(f"wrote {GOLDEN}; review and commit it")
    assert losses == pytest.approx(json.loads(GOLDEN.read_text()), rel=1e-4, abs=1e-6)
    assert sum(losses[-3:]) < sum(losses[:3])
    # the stream: flat objects with namespaced keys, a start, evals, checkpoint and end
    events = [r["event"] for r in rows]
    assert events[0] == "start" and events[1] == "eval" and events[-1] == "end"
    assert "checkpoint" in events and events.count("eval") == 2
    need = {"step", "time", "lr", "loss/total", "loss/direct", "loss/reg", "grad_norm", "tokens_per_s", "eta_s",
            "skipped_steps", "curriculum/stage", "curriculum/mixing_ratio", "kd/weight", "layer/2/direct_mse",
            "layer/3/v_a_norm", "layer/3/v_b_norm", "layer/2/v_a_attn_sim"}
    assert need <= set(train[-1])
    assert all(not isinstance(v, (dict, list)) for r in rows for v in r.values())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["schedule"]["total_steps"] == 20 and saved["model"]["path"] == "tiny"
    ev = [r for r in rows if r["event"] == "eval"]
    assert ev[0]["eval/ppl_base"] == pytest.approx(ev[1]["eval/ppl_base"])  # the frozen base did not move
    for i in (2, 3):  # held-out per-layer fidelity: each layer's error on the teacher's input falls
        assert ev[1][f"eval/layer/{i}/direct_mse_teacher_in"] < ev[0][f"eval/layer/{i}/direct_mse_teacher_in"]


def test_diagnostics_averaged_over_the_steps_that_formed_them(tmp_path):
    """v_a/v_b metrics are formed on log steps only; losses average over every step of the window."""
    rows = run(tmp_path, "schedule.total_steps=6", "checkpoint.every=0", "logging.log_every=3")
    train = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    every = run(tmp_path / "every", "schedule.total_steps=6", "checkpoint.every=0", "logging.log_every=1")
    every = [r for r in every if r["event"] == "train"]
    for r in train:  # the v_a norm of the log step itself, not a third of it
        assert r["layer/2/v_a_norm"] == pytest.approx(every[r["step"] - 1]["layer/2/v_a_norm"], rel=1e-5)
        window = every[r["step"] - 3:r["step"]]
        assert r["loss/total"] == pytest.approx(sum(w["loss/total"] for w in window) / 3, rel=1e-5)


def test_consecutive_nan_stops_with_last_good_checkpoint(tmp_path):
    from npt_ds.train.trainer import TrainingDiverged

    trainer = make_trainer(tmp_path, "checkpoint.every=2", "inject_nan={step: 5, rank: 0, repeat: 10}",
                           "logging.max_consecutive_nan=3")
    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite .*last good checkpoint: .*step-00000004"):
        trainer.train()
    trainer.close()
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-00000004"
    assert json.loads((ckpt / "step-00000004" / "meta.json").read_text())["step"] == 4
    nan_rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "nan_step"]
    assert [r["skipped_steps"] for r in nan_rows] == [1, 2, 3]


def test_single_nan_batch_is_skipped_and_training_continues(tmp_path):
    rows = run(tmp_path, "schedule.total_steps=6", "checkpoint.every=0", "checkpoint.save_final=false",
               "inject_nan={step: 2, rank: 0}")
    train = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["skipped_steps"] == 1 and all(r["loss/total"] == r["loss/total"] for r in train)


def test_existing_run_is_not_overwritten(tmp_path):
    run(tmp_path, "schedule.total_steps=2", "checkpoint.every=0")
    with pytest.raises(ConfigError, match="already holds checkpoints; set checkpoint.resume: auto"):
        make_trainer(tmp_path, "schedule.total_steps=2", "checkpoint.resume=none")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint dir"):
        make_trainer(tmp_path, f"checkpoint.resume={tmp_path}/nowhere")


def test_grad_accumulation_and_bf16(tmp_path):
    rows = run(tmp_path, "schedule.total_steps=3", "optim.grad_accum=2", "deepspeed.precision=bf16",
               "checkpoint.every=0", "checkpoint.save_final=false")
    train = [r for r in rows if r["event"] == "train"]
    assert [r["tokens"] for r in train] == [128, 256, 384]  # 2 micro-batches of 2x32 tokens per step


def test_wandb_offline_sink(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path, wandb_cfg={"project": "npt-test", "name": "t"}, console=False)
    writer.log({"step": 1, "loss/total": 0.5, "curriculum/stage": "teacher"})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss/total"] == 0.5
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_corrupt_metric_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "loss\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_cli_convert_and_eval_on_tiny(tmp_path, capsys):
    from npt_ds.cli import main

    assert main(["convert", "--model", "tiny", "--layers", "2-3", "--rank", "4", "--out", str(tmp_path)]) == 0
    assert "converted layers [2, 3] of 4" in capsys.readouterr().out
    assert main(["eval", "--model", "tiny", "--np", str(tmp_path), "--batches", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "base perplexity" in out and "NPT perplexity" in out
    assert main(["convert", "--model", "tiny", "--layers", "9", "--out", str(tmp_path / "x")]) == 2
    assert "layer 9 is out of range; the model has 4 layers" in capsys.readouterr().err
