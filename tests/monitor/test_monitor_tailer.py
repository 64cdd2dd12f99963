"""npt-monitor: FileTailer / TailerThread / check_file on real files."""

from __future__ import annotations

import os
import threading
import time

from npt_monitor.run import Run, check_file
from npt_monitor.synth import synth_lines
from npt_monitor.tailer import FileTailer, TailerThread


def lines_of(chunk):
    return list(chunk.lines)


def test_missing_file_is_waited_for(tmp_path):
    path = tmp_path / "metrics.jsonl"
    t = FileTailer(path)
    assert t.poll() is None and not t.exists
    path.write_bytes(b'{"step": 1}\n')
    chunk = t.poll()
    assert t.exists and lines_of(chunk) == ['{"step": 1}'] and chunk.first_line_no == 1 and not chunk.reset
    assert t.poll() is None


def test_partial_last_line_is_held_until_newline(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "loss/to')
    t = FileTailer(path)
    assert lines_of(t.poll()) == ['{"step": 1}']
    assert t.poll() is None
    with open(path, "ab") as fh:
        fh.write(b'tal": 1.5}\n{"step"')
    chunk = t.poll()
    assert lines_of(chunk) == ['{"step": 2, "loss/total": 1.5}'] and chunk.first_line_no == 2
    with open(path, "ab") as fh:
        fh.write(b': 3}\n')
    chunk = t.poll()
    assert lines_of(chunk) == ['{"step": 3}'] and chunk.first_line_no == 3


def test_complete_object_without_newline_is_delivered_once(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}')
    t = FileTailer(path)
    assert lines_of(t.poll()) == ['{"step": 1}', '{"step": 2}']
    with open(path, "ab") as fh:
        fh.write(b'\n{"step": 3}\n')
    chunk = t.poll()
    assert lines_of(chunk) == ['{"step": 3}'] and chunk.first_line_no == 3


def test_truncation_restarts_from_zero(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n')
    t = FileTailer(path)
    t.poll()
    path.write_bytes(b'{"step": 9}\n')  # shorter than what was read
    chunk = t.poll()
    assert chunk.reset and chunk.reason == "truncated"
    assert lines_of(chunk) == ['{"step": 9}'] and chunk.first_line_no == 1


def test_rotation_reopens_new_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n')
    t = FileTailer(path)
    t.poll()
    os.rename(path, tmp_path / "m.jsonl.1")
    assert t.poll() is None  # old handle drained, new file not there yet
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    chunk = t.poll()
    assert chunk.reset and chunk.reason == "rotated"
    assert len(chunk.lines) == 3 and chunk.first_line_no == 1


def test_large_file_is_read_in_chunks(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = synth_lines(500)
    path.write_text("\n".join(lines) + "\n")
    t = FileTailer(path, read_size=4096)
    got = []
    while (chunk := t.poll()) is not None:
        assert chunk.first_line_no == len(got) + 1
        got.extend(chunk.lines)
    assert got == lines


def test_invalid_utf8_line_is_kept_as_bytes_and_reported_corrupt(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "x": "\xff"}\n{"step": 3}\n')
    run, corrupt = check_file(path)
    assert run.state.step == 3 and run.state.n_records == 2
    assert [(c.line_no, c.reason) for c in corrupt] == [(2, "not JSON (UnicodeDecodeError)")]


def test_tailer_thread_delivers_parsed_batches_with_backpressure(tmp_path):
    path = tmp_path / "m.jsonl"
    batches = []
    got = threading.Event()
    thread: TailerThread

    def sink(batch):
        batches.append(batch)
        thread.done()
        if sum(len(b.batch) for b in batches) >= 3:
            got.set()

    thread = TailerThread(path, sink, interval=0.02)
    thread.start()
    try:
        time.sleep(0.1)
        assert batches and batches[0].exists is False  # "waiting for file" notice
        path.write_text('{"step": 1}\nnot json\n')
        with open(path, "a") as fh:
            fh.write('{"step": 2}\n{"step": 3}\n')
        assert got.wait(5)
    finally:
        thread.stop()
        thread.join(2)
    assert not thread.is_alive()
    steps = [r["step"] for b in batches for r in b.batch.records]
    assert steps == [1, 2, 3]
    assert [c.line_no for b in batches for c in b.corrupt] == [2]


def test_check_file_reports_corrupt_lines_and_incomplete_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = synth_lines(20)
    lines.insert(5, "this is not json")
    lines.insert(9, "[1, 2, 3]")
    path.write_text("\n".join(lines) + '\n{"step": 21, "loss')
    run, corrupt = check_file(path)
    assert [(c.line_no, c.reason.split(" (")[0]) for c in corrupt] == [
        (6, "not JSON"),
        (10, "not a JSON object"),
        (24, "incomplete last line"),
    ]
    assert run.state.corrupt_count == 3
    assert run.state.step == 20 and run.alerts == []


def test_run_reset_clears_state_and_alerts(tmp_path):
    run = Run(tmp_path / "m.jsonl")
    run.ingest_lines(['{"step": 1, "kd/kl": 9.4}'])
    assert len(run.alerts) == 1 and run.state.step == 1
    run.reset("truncated")
    assert run.alerts == [] and run.state.step is None and run.state.n_records == 0
    run.ingest_lines(['{"step": 1, "kd/kl": 9.4}'])
    assert len(run.alerts) == 1  # detectors re-armed too


def test_overlong_line_is_one_corrupt_line_and_memory_stays_bounded(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n' + b"x" * 5000)
    t = FileTailer(path, read_size=1024, max_line=2048)
    got = []
    while (chunk := t.poll()) is not None:
        got.extend(chunk.lines)
        assert len(t.partial) <= 2048 + 1024
    with open(path, "ab") as fh:
        fh.write(b"yyy\n" + b'{"step": 2}\n')
    while (chunk := t.poll()) is not None:
        got.extend(chunk.lines)
    from npt_monitor.parsing import parse_lines

    batch, corrupt = parse_lines(got)
    assert [r["step"] for r in batch.records] == [1, 2]
    assert [c.line_no for c in corrupt] == [2]
    assert batch.line_nos == [1, 3]
