"""Small parts of fault handling: output that outlives its reader, and how an attempt ended (for launch/*.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from npt_ds.train.outcome import last_ending, main as outcome


def test_a_rank_whose_output_pipe_closes_keeps_running():
    """The child writes after its reader is gone: it ends normally (exit 0), as a preempted rank must to save."""
    child = ("import sys, time; from npt_ds.train.faults import SurvivingOutput; SurvivingOutput.install(); "
             "print('first', flush=True); time.sleep(0.5); "
             "[print('x' * 100, flush=True) for _ in range(1000)]; sys.stderr.write('done\\n'); open(sys.argv[1], 'w').write('ok')")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "ok")
        proc = subprocess.Popen([sys.executable, "-c", child, marker], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout.readline() == b"first\n"
        proc.stdout.close()  # the reader goes away (pdsh killed, ssh session closed)
        assert proc.wait(timeout=60) == 0 and open(marker).read() == "ok"


def test_the_outcome_of_an_attempt(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"time": 10.0, "event": "end"}, {"time": 20.0, "event": "train"}, {"time": 21.0, "event": "preempted"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"time": 22, "ev')
    assert last_ending(run / "metrics.jsonl", 15.0) == "preempted"
    assert last_ending(run / "metrics.jsonl", 25.0) is None and last_ending(tmp_path / "none.jsonl", 0) is None
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"logging: {{run_dir: {run}}}\n")
    assert outcome([str(cfg), "--since", "15"]) == 0 and capsys.readouterr().out.strip() == "preempted"
    assert outcome([str(cfg), "--since", "25"]) == 1 and capsys.readouterr().out.strip() == "none"
    assert outcome([str(cfg), "logging.run_dir=" + str(tmp_path), "--since", "0"]) == 1  # an override moves the run
    assert outcome([str(tmp_path / "missing.yaml"), "--since", "0"]) == 2
