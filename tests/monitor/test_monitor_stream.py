"""npt-monitor: line parsing, Series and RunState (pure, no Textual)."""

from __future__ import annotations

import json
import math

import pytest

from npt_monitor.formatting import fmt_num, format_eta, format_rate
from npt_monitor.state import RunState, Series
from npt_monitor.parsing import (
    Batch,
    CorruptLine,
    metrics_path,
    parse_line,
    parse_lines,
)
from npt_monitor.synth import synth_lines, synth_records


def test_parse_line_accepts_nan_and_infinity_tokens():
    obj = parse_line(b'{"step": 3, "loss/total": NaN, "grad_norm": Infinity, "x": -Infinity}', 1)
    assert obj["step"] == 3
    assert math.isnan(obj["loss/total"])
    assert obj["grad_norm"] == math.inf and obj["x"] == -math.inf


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"step": 1, "loss', "not JSON"),
        (b"garbage", "not JSON"),
        (b"[1, 2]", "not a JSON object (list)"),
        (b"42", "not a JSON object (int)"),
        (b'"text"', "not a JSON object (str)"),
        (b"\xff\xfe{}", "not JSON"),
    ],
)
def test_parse_line_rejects_corrupt_lines(raw, reason):
    with pytest.raises(CorruptLine) as info:
        parse_line(raw, 17)
    assert info.value.line_no == 17
    assert info.value.reason.startswith(reason)


def test_parse_lines_numbers_lines_and_skips_blank_ones():
    lines = [b'{"step": 1}', b"", b"  ", b"oops", b'{"step": 2, "loss/total": NaN}', b"[]", b'{"step": 3}\r']
    batch, corrupt = parse_lines(lines, first_line_no=10)
    assert [o["step"] for o in batch.records] == [1, 2, 3]
    assert batch.line_nos == [10, 14, 16]
    assert [(c.line_no, c.reason.split(" (")[0]) for c in corrupt] == [(13, "not JSON"), (15, "not a JSON object")]
    assert batch.maybe_nonfinite == [1]  # only the record whose text has NaN
    assert batch.nonfinite_keys(1) == ["loss/total"]


def test_batch_prepare_carries_steps_and_defaults_events():
    batch = Batch.from_dicts(
        [{"event": "start", "run/name": "x"}, {"step": 5}, {"loss/total": 1.0}, {"step": 7.0, "event": "eval"}]
    )
    batch.prepare(last_step=None)
    assert batch.steps == [0, 5, 5, 7]
    assert batch.events == ["start", "train", "train", "eval"]
    assert batch.last_step == 7


def test_series_keeps_every_point_until_cap_then_halves():
    s = Series(cap=16)
    for i in range(15):
        s.append(i, float(i))
    assert list(s.xs) == list(range(15)) and s.stride == 1
    s.append(15, 15.0)  # reaches cap: every other point kept, stride doubles
    assert s.stride == 2 and list(s.xs) == list(range(0, 16, 2))
    for i in range(16, 1000):
        s.append(i, float(i))
    assert len(s) < 16 and s.count == 1000
    assert s.last_x == 999 and s.last_y == 999.0
    xs, ys = s.window()
    assert xs[-1] == 999  # newest point always present
    assert xs == sorted(xs)


def test_series_extend_matches_append_density():
    a, b = Series(cap=64), Series(cap=64)
    xs = list(range(1, 1001))
    ys = [float(x) for x in xs]
    for x, y in zip(xs, ys):
        a.append(x, y)
    for i in range(0, 1000, 37):
        b.extend(xs[i : i + 37], ys[i : i + 37])
    assert a.count == b.count == 1000
    assert a.stride == b.stride
    assert abs(len(a) - len(b)) <= 2
    assert b.last_x == 1000


def test_series_rewind_drops_stale_tail():
    s = Series()
    for i in range(1, 11):
        s.append(i, i * 1.0)
    s.append(6, 60.0)  # trainer restarted from step 5
    assert list(s.xs) == [1, 2, 3, 4, 5, 6]
    assert list(s.ys)[-1] == 60.0


def test_series_window_range_skips_nonfinite_and_downsamples_keeping_spikes():
    s = Series()
    for i in range(1000):
        s.append(i, 100.0 if i == 500 else (math.nan if i == 10 else 1.0))
    xs, ys = s.window(0, 999, max_points=50)
    assert len(xs) <= 50
    assert 100.0 in ys  # spike survives min/max bucketing
    assert all(math.isfinite(y) for y in ys)
    xs, _ = s.window(100, 199)
    assert xs[0] == 100 and xs[-1] == 199 and len(xs) == 100


def test_runstate_header_and_layers_from_synth_run():
    st = RunState("/runs/exp1/metrics.jsonl")
    batch, corrupt = parse_lines(synth_lines(50, run_name="smol-npt", total_steps=200, n_layers=3))
    assert corrupt == []
    st.ingest(batch)
    h = st.header()
    assert h.name == "smol-npt"
    assert h.step == 50 and h.total_steps == 200
    assert h.stage == "mixed" and h.mixing_ratio == pytest.approx(0.125)
    assert h.kd_weight == pytest.approx(0.5 * (1 - 0.5 * 50 / 200), abs=1e-5)
    assert h.eta_s == pytest.approx(150 * 0.8)
    assert h.tokens_per_s is not None and 11000 < h.tokens_per_s < 13000
    layers = st.layers()
    assert list(layers) == [0, 1, 2]
    assert set(layers[2]) == {"direct_mse", "v_a_norm", "v_b_norm", "v_a_attn_sim"}
    assert "loss/guidance/attn" in st.numeric_keys()
    assert "step" not in st.numeric_keys() and "time" not in st.numeric_keys()
    assert st.series["loss/total"].count == 50


def test_layers_include_the_latest_held_out_values():
    st = RunState("/runs/exp2/metrics.jsonl")
    recs = [{"step": 10, "event": "train", "layer/26/direct_mse": 5.0, "layer/26/v_a_norm": 1.0},
            {"step": 10, "event": "eval", "eval/layer/26/direct_mse_teacher_in": 4.5,
             "eval/layer/26/direct_mse_student_in": 4.75, "eval/ppl_npt": 50.0},
            {"step": 20, "event": "eval", "eval/layer/26/direct_mse_student_in": 4.25}]
    batch, corrupt = parse_lines([json.dumps(r) for r in recs])
    assert corrupt == []
    st.ingest(batch)
    assert st.layers() == {26: {"direct_mse": 5.0, "v_a_norm": 1.0, "eval/direct_mse_teacher_in": 4.5,
                                "eval/direct_mse_student_in": 4.25}}


def test_runstate_name_falls_back_to_run_dir_and_eta_to_time_field():
    st = RunState("/runs/exp7/metrics.jsonl")
    recs = [
        {"step": 0, "event": "start", "run/total_steps": 100},
        {"step": 10, "time": 1000.0, "loss/total": 2.0},
        {"step": 20, "time": 1010.0, "loss/total": 1.9, "mystery/metric": 3, "note": "hi"},
    ]
    st.ingest(Batch.from_dicts(recs))
    assert st.display_name == "exp7"
    assert st.header().eta_s == pytest.approx(80.0)  # 1 s/step from the `time` field
    assert "mystery/metric" in st.numeric_keys()
    assert st.strings["note"] == "hi"
    assert RunState("/tmp/foo.jsonl").display_name == "foo"


def test_runstate_unknown_and_mixed_type_keys_do_not_crash():
    st = RunState()
    st.ingest(Batch.from_dicts([{"step": 1, "a": 1.0, "b": [1, 2]}, {"step": 2, "a": "n/a", "b": {"x": 1}}, {"step": 3, "a": 3}]))
    assert list(st.series["a"].xs) == [1, 3]
    assert "b" not in st.series


def test_metrics_path(tmp_path):
    assert metrics_path(tmp_path) == tmp_path / "metrics.jsonl"
    assert metrics_path(tmp_path / "new_run") == tmp_path / "new_run" / "metrics.jsonl"
    assert metrics_path(tmp_path / "m.jsonl") == tmp_path / "m.jsonl"


def test_formatters():
    assert format_eta(None) == "--"
    assert format_eta(45) == "45s"
    assert format_eta(200) == "3m20s"
    assert format_eta(3720) == "1h02m"
    assert format_eta(90000) == "1d01h"
    assert format_rate(12345) == "12.3k"
    assert format_rate(math.nan) == "--"
    assert fmt_num(math.nan) == "NaN" and fmt_num(math.inf) == "Inf" and fmt_num(None) == "--"


def test_synth_records_are_flat_json_objects_with_schema_keys():
    recs = list(synth_records(20, nan_at={5}, eval_every=10))
    assert recs[0]["event"] == "start" and recs[0]["run/name"]
    nan_line = next(r for r in recs if r.get("event") == "nan_step")
    assert nan_line["step"] == 5 and nan_line["skipped_steps"] == 1 and math.isnan(nan_line["loss/total"])
    assert sum(r.get("event") == "eval" for r in recs) == 2
    for r in recs:
        assert all(not isinstance(v, (dict, list)) for v in r.values())
        json.dumps(r)


# -- orjson parsing (stdlib fallback) and columnar extraction ------------------------

#: lines that are corrupt on their own, or valid but unusual
TRICKY_LINES = [
    '{"step": 1500, "loss',  # truncated
    '{"a": 1},{"b": 2}',  # two objects on one line
    '{"c": [["x"',
    '"y"]]}',
    '{"c": {"d": 1}',
    '{"e": 1}}',
    '{"a": "x},{',
    '{", "b": 1}',
    "",
    "garbage",
    "[1, 2]",
    '{"s": "[not an array]", "loss/total": 3.0}',  # valid, but has brackets
    ' {"lead": 1}',  # valid, leading space
    '{"x": null, "loss/total": null, "note": "n/a"}',
    '{"big": 1e400, "nan": NaN, "neg": -Infinity}',  # orjson rejects these; the stdlib json reads inf/nan
    '{"s": "tab\there"}',  # a raw control character in a string: both reject it
    b'{"bad utf-8": "\xff"}',
]


def _reference_parse(lines, first_line_no=1):
    """One stdlib ``json.loads`` per line: what parse_lines must give."""
    records, line_nos, corrupt = [], [], []
    for k, raw in enumerate(lines, first_line_no):
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            if raw.strip():
                corrupt.append((k, f"not JSON ({getattr(exc, 'msg', type(exc).__name__)})"))
            continue
        if type(obj) is not dict:
            corrupt.append((k, f"not a JSON object ({type(obj).__name__})"))
            continue
        records.append(obj)
        line_nos.append(k)
    return records, line_nos, corrupt


def _fingerprint_run(run):
    st = run.state
    return {
        "series": {
            k: (list(s.xs), list(s.ys), s.stride, s.count, s.last_x, repr(s.last_y)) for k, s in st.series.items()
        },
        "latest": {k: repr(v) for k, v in st.latest.items()},
        "strings": st.strings,
        "events": st.events,
        "counts": (st.n_lines, st.n_records, st.corrupt_count, st.step, st.total_steps, st.first_time, st.last_time),
        "corrupt": [(c.line_no, c.reason) for c in st.corrupt_samples],
        "alerts": [(a.step, a.kind, a.message, a.line_no) for a in run.alerts],
    }


def _faulty_lines():
    lines = synth_lines(3000, eval_every=250, nan_at={700}, kl_at={1200: 9.5}, n_layers=2, end=True)
    for k, bad in enumerate(TRICKY_LINES):  # corrupt lines in the middle of the run
        lines.insert(1000 + 97 * k, bad)
    return lines


def test_parse_lines_matches_stdlib_json_line_by_line():
    lines = _faulty_lines()
    batch, corrupt = parse_lines(lines, 5)
    records, line_nos, bad = _reference_parse(lines, 5)
    assert repr(batch.records) == repr(records)  # repr: NaN == NaN
    assert [type(v) for o in batch.records for v in o.values()] == [type(v) for o in records for v in o.values()]
    assert batch.line_nos == line_nos
    assert [(c.line_no, c.reason) for c in corrupt] == bad
    nonfinite = [i for i, o in enumerate(records) if any(type(v) is float and not math.isfinite(v) for v in o.values())]
    assert set(nonfinite) <= set(batch.maybe_nonfinite)  # every non-finite record is checked by the alerts
    assert len(batch.maybe_nonfinite) == len(nonfinite) == 2  # ...and only the lines orjson rejected
    assert batch.nonfinite_keys(nonfinite[-1]) == ["big", "nan", "neg"]


def test_orjson_parses_and_the_stdlib_json_only_sees_the_lines_it_rejects(monkeypatch):
    import npt_monitor.parsing as stream

    calls = []
    loads = json.loads
    monkeypatch.setattr(stream.json, "loads", lambda raw: calls.append(raw) or loads(raw))
    lines = synth_lines(3000, nan_at={700})
    lines.insert(1500, '{"step": 1500, "loss')
    batch, corrupt = parse_lines(lines)
    assert [c.line_no for c in corrupt] == [1501] and len(batch) == len(lines) - 1
    assert calls == [next(raw for raw in lines if "NaN" in raw), lines[1500]]
    assert [batch.records[i]["step"] for i in batch.maybe_nonfinite] == [700]


def test_model_from_parsed_lines_matches_model_from_stdlib_json_records():
    from npt_monitor.run import Run

    lines = _faulty_lines()
    models = []
    for parse in (parse_lines, None):
        run = Run("/runs/x/metrics.jsonl", max_points=256)  # small cap: the stride doubling runs too
        for i in range(0, len(lines), 500):
            if parse is not None:
                run.ingest(*parse(lines[i : i + 500], i + 1))
            else:
                records, line_nos, bad = _reference_parse(lines[i : i + 500], i + 1)
                run.ingest(Batch(records, line_nos), [CorruptLine(*c) for c in bad])
        models.append(_fingerprint_run(run))
    assert models[0] == models[1]
    assert models[0]["counts"][2] == 12  # the corrupt lines (not the blank one nor the 4 valid ones)
    assert {a[1] for a in models[0]["alerts"]} >= {"nonfinite", "skipped", "kl_high"}


def test_numeric_columns_skip_missing_null_bool_and_text():
    batch = Batch.from_dicts([
        {"step": 1, "a": 1, "b": True, "c": "warmup"},
        {"step": 2, "a": None, "b": 2.5, "c": 3.0},
        {"step": 3, "b": False, "c": "main"},
        {"step": 4, "a": math.nan, "c": None},
    ]).prepare(None)
    idx, ys, last, text = batch.numeric("a")
    assert idx.tolist() == [0, 3] and repr(ys.tolist()) == "[1.0, nan]" and math.isnan(last) and text is None
    idx, ys, last, text = batch.numeric("b")
    assert idx.tolist() == [1] and ys.tolist() == [2.5] and last == 2.5 and text is None
    idx, ys, last, text = batch.numeric("c")
    assert idx.tolist() == [1] and ys.tolist() == [3.0] and last == 3.0 and text == "main"
    idx, ys, last, text = batch.numeric("step")
    assert idx is None and ys.tolist() == [1, 2, 3, 4] and type(last) is int
    batch, _ = parse_lines(['{"step": 1, "a": 1.0}', '{"step": 2}', '{"step": 3, "a": NaN}', '{"step": 4, "a": null}'])
    assert batch.maybe_nonfinite == [2]
    idx, ys, last, _ = batch.numeric("a")  # a NaN value is a point, a gap is not
    assert idx.tolist() == [0, 2] and repr(ys.tolist()) == "[1.0, nan]" and math.isnan(last)
    st = RunState()
    st.ingest(Batch.from_dicts([{"step": 1, "flag": True}, {"step": 2, "flag": False}]))
    assert "flag" not in st.series and "flag" not in st.latest  # bool is not a number


def test_batch_columns_match_per_record_lookups():
    recs = [
        {"step": 1, "a": 1.0, "b": 2.0},
        {"step": 2, "a": 1.5, "b": 2.5},
        {"step": 3, "b": 3.0, "a": 1.0},  # same keys, other order
        {"step": 4, "a": None, "c": 1.0},  # same number of keys, not the same keys
        {"step": 5, "event": "eval", "eval/loss": 2.0},
        {},
        {"step": 6, "a": 2.0, "b": "text"},
    ]
    for records in (recs, recs * 50, [{"k": i, f"x{i % 3}": i} if i % 2 else {"k": i} for i in range(300)]):
        batch = Batch.from_dicts(records).prepare(None)
        keys = set().union(*records)
        assert batch.keys() == keys
        for key in keys | {"absent"}:
            assert batch.column(key) == [o.get(key) for o in records], key
            idx, ys, last, _ = batch.numeric(key)
            have = [i for i, o in enumerate(records) if type(o.get(key)) in (int, float)]
            assert (list(range(len(records))) if idx is None else idx.tolist()) == have, key
            assert ys.tolist() == [float(records[i][key]) for i in have]
            assert last == (records[have[-1]][key] if have else None)
        idx, vals = batch.train_finite_columns("a")
        train_a = [(i, o["a"]) for i, o in enumerate(records)
                   if type(o.get("a")) in (int, float) and o.get("event", "train") == "train"]
        assert list(zip(idx, vals)) == train_a
