"""Checkpoints: pruning by write order, atomic re-saves, elastic-resume refusals, RNG state, adaptive-weighting resume."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from npt_ds.train import checkpoint
from npt_ds.config import ConfigError
from test_trainer import make_trainer, run


def step_dirs(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def train_losses(rows):
    return {r["step"]: r["loss/total"] for r in rows if r["event"] == "train"}


@pytest.mark.slow
def test_keep_last_prunes_by_write_order_never_the_new_checkpoint(tmp_path):
    """The review's repro: resume from step 10 of {10, 20, 30}, save at 15 with keep_last=2."""
    run(tmp_path, "schedule.total_steps=30", "checkpoint.every=10", "checkpoint.keep_last=3")
    ckpt = tmp_path / "checkpoints"
    assert step_dirs(ckpt) == ["step-00000010", "step-00000020", "step-00000030"]
    run(tmp_path, "schedule.total_steps=30", f"checkpoint.resume={ckpt / 'step-00000010'}", "checkpoint.every=5",
        "checkpoint.keep_last=2", "schedule.stop_at=15")
    assert (ckpt / "latest").read_text() == "step-00000015"
    assert step_dirs(ckpt) == ["step-00000015", "step-00000030"]  # the two written last
    assert json.loads((ckpt / "step-00000015" / "meta.json").read_text())["step"] == 15
    assert not list(ckpt.glob(".tmp-*"))


def test_a_failed_re_save_leaves_the_existing_step_dir_untouched(tmp_path, monkeypatch):
    run(tmp_path, "schedule.total_steps=2", "checkpoint.every=0")
    step = tmp_path / "checkpoints" / "step-00000002"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in step.rglob("*") if p.is_file()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint, "save_np_weights", killed)
    trainer = make_trainer(tmp_path, "schedule.total_steps=2", "checkpoint.every=0", "checkpoint.resume=auto")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()  # a finished run re-saves its final step
    trainer.close()
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in step.rglob("*") if p.is_file()} == before
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"
    monkeypatch.undo()
    rows = run(tmp_path, "schedule.total_steps=2", "checkpoint.every=0", "checkpoint.resume=auto")
    assert rows[-1]["event"] == "end" and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_resume_on_another_world_size_without_a_portable_state_is_refused_in_one_line(tmp_path, capsys):
    """(The elastic resume itself runs 2 ranks -> 1 in test_distributed.py.)  A checkpoint without portable.pt,
    or whose global batch this world size cannot make, is refused before training; nothing is written."""
    run(tmp_path, "schedule.total_steps=2", "checkpoint.every=0")
    step = tmp_path / "checkpoints" / "step-00000002"
    meta = step / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 2}))
    shutil.rmtree(step / "portable")  # ZeRO-3's sharded portable state (ZeRO-1/2 write portable.pt)
    before = sorted(p.name for p in step.iterdir())
    with pytest.raises(ConfigError, match=r"has no portable.pt .*; resume it on the world size that wrote it"):
        make_trainer(tmp_path, "schedule.total_steps=4", "checkpoint.resume=auto")
    from npt_ds.train.run import main

    args = ["configs/tiny_debug.yaml", f"logging.run_dir={tmp_path}", "logging.console=false",
            "schedule.total_steps=4", "checkpoint.resume=auto", "data.micro_batch_size=3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global batch of 4 windows" in err[0] and "data.micro_batch_size" in err[0]
    assert sorted(p.name for p in step.iterdir()) == before


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    saved, restored = torch.arange(4, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: saved.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a: restored.append(state))
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], saved)
    checkpoint.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], saved)


@pytest.mark.slow
def test_resume_with_adaptive_weighting_is_exact(tmp_path):
    """The adaptive-weighting EMA travels in meta.json (ZeRO-3, one rank): a resumed run repeats every loss."""
    args = ("schedule.total_steps=8", "checkpoint.every=0", "loss.adaptive_weighting=true",
            "loss.fidelity_weight=0.5")
    full = train_losses(run(tmp_path / "full", *args))
    run(tmp_path / "resumed", *args, "schedule.stop_at=4")
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert set(meta["adaptive_norms"]) == {"direct", "fidelity"}
    resumed = train_losses(run(tmp_path / "resumed", *args, "checkpoint.resume=auto"))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), step


def test_messages_name_the_latest_checkpoint_not_the_highest_step(tmp_path):
    """After a resume from an earlier step, `latest` names it; the divergence and abort messages must too."""
    from types import SimpleNamespace

    from npt_ds.train.trainer import Trainer, TrainingDiverged

    ckpt = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        (ckpt / checkpoint.step_tag(step)).mkdir(parents=True)
    (ckpt / "latest").write_text("step-00000010")
    assert checkpoint.latest_step_dir(ckpt) == ckpt / "step-00000010"
    logged = []
    fake = SimpleNamespace(skipped=0, consecutive_bad=0, step=12, ckpt_root=ckpt,
                           cfg=SimpleNamespace(logging=SimpleNamespace(max_consecutive_nan=1)),
                           metrics=SimpleNamespace(log=logged.append, message=lambda text: None))
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint: .*step-00000010\)"):
        Trainer.on_bad_batch(fake, {})
    (ckpt / "latest").unlink()
    assert checkpoint.latest_step_dir(ckpt) is None


def test_ranks_that_disagree_on_the_resume_step_get_one_line_naming_the_nodes():
    same = [{"rank": r, "host": "n1", "step": 20} for r in range(4)]
    assert checkpoint.resume_disagreement(same) is None
    views = [{"rank": 0, "host": "n1", "step": 20}, {"rank": 1, "host": "n1", "step": 20},
             {"rank": 2, "host": "n2", "step": None}, {"rank": 3, "host": "n2", "step": None}]
    line = checkpoint.resume_disagreement(views)
    assert "\n" not in line and "n1 (ranks 0,1): step-00000020; n2 (ranks 2,3): no checkpoint" in line
    broken = [{"rank": 0, "host": "n1", "step": 5}, {"rank": 1, "host": "n2", "error": "checkpoint.resume: bad"}]
    assert checkpoint.resume_disagreement(broken) == "checkpoint.resume: bad"  # the same line on every rank
