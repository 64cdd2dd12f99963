"""Prepared token shards (`npt-ds prepare`), the global sample cursor and the batch-shape side of elastic resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from npt_ds.cli import main as npt_ds
from npt_ds.config import ConfigError, config_from_dict
from npt_ds.data.sources import PackedBatches, PreparedWindows, eval_batches
from npt_ds.train.elastic import keep_global_batch
from npt_ds.model import ByteTokenizer
from npt_ds.data.prepared import PreparedCorpus

TEXT = "".join(f"Line {i} of a document that is long enough to give several windows.\n" for i in range(40))


def one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {d}: " + TEXT[: 500 + 97 * d]}) + "\n" for d in range(30)))
    return path


def prepare(src, out, *extra) -> int:
    return npt_ds(["prepare", str(src), "--tokenizer", "tiny", "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def prepared(corpus_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "p"
    assert prepare(corpus_files, out, "--workers", "1") == 0
    return out


def data_cfg(path, **data):
    return config_from_dict({"data": {"source": "prepared", "path": str(path), "seq_len": 32,
                                      "micro_batch_size": 2, **data}}).data


def test_prepare_writes_the_documents_joined_by_eos(prepared, corpus_files):
    index = json.loads((prepared / "index.json").read_text())
    assert index["format"] == "npt-ds-prepared" and index["version"] == 1 and index["dtype"] == "uint16"
    assert index["documents"] == 30 and index["eos_id"] == 256 and index["tokenizer"] == "bytes"
    tokens = np.load(prepared / index["shards"][0]["file"])
    texts = [json.loads(line)["text"] for line in corpus_files.read_text().splitlines()]
    expected = [t for text in texts for t in [*text.encode(), 256]]
    assert tokens.tolist() == expected and index["tokens"] == len(expected)


def test_two_workers_write_the_same_shards(prepared, corpus_files, tmp_path, monkeypatch):
    import npt_ds.data.prepare as prep

    monkeypatch.setattr(prep, "TASK_CHARS", 3000)  # several tasks, so the two workers really share them
    monkeypatch.setattr(prep, "SHARD_TOKENS", 4000)
    out = tmp_path / "p2"
    assert prepare(corpus_files, out, "--workers", "2", "--shard-tokens", "4000") == 0
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) > 1
    joined = np.concatenate([np.load(out / s["file"]) for s in index["shards"]])
    reference = np.load(prepared / "shard-00000.npy")
    assert np.array_equal(joined, reference)


def test_prepare_refuses_an_existing_dir_and_leaves_no_half_index(prepared, corpus_files, tmp_path, monkeypatch,
                                                                  capsys):
    before = (prepared / "index.json").read_text()
    assert prepare(corpus_files, prepared) == 2
    assert "already exists" in capsys.readouterr().err and (prepared / "index.json").read_text() == before
    import npt_ds.data.prepare as prep

    calls = []

    def dies(task):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # interrupted half way
        return real(task)

    real = prep.tokenise_task
    monkeypatch.setattr(prep, "TASK_CHARS", 2000)
    monkeypatch.setattr(prep, "tokenise_task", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus_files, tmp_path / "half", "--workers", "1")
    assert list(tmp_path.iterdir()) == []  # neither the dir nor its temp dir


def test_bad_prepared_dirs_give_one_line_errors(prepared, tmp_path):
    with pytest.raises(ConfigError, match="data.path: .* is not a prepared dir") as err:
        PreparedCorpus.open(tmp_path / "missing")
    one_line(err)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    index = json.loads((broken / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(ConfigError, match="version 99, this npt-ds reads 'npt-ds-prepared' version 1") as err:
        PreparedCorpus.open(broken)
    (broken / "index.json").write_text(json.dumps(index))
    shard = broken / index["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(ConfigError, match="missing or damaged|truncated") as err:
        PreparedCorpus.open(broken)
    one_line(err)
    with pytest.raises(ConfigError, match="data.seq_len: 100000 is longer than every shard") as err:
        PreparedCorpus.open(prepared).windows(100000)
    one_line(err)


def test_a_corpus_prepared_with_another_tokenizer_names_both(prepared):
    from npt_ds.config import ModelConfig
    from npt_ds.model import load_tokenizer

    with pytest.raises(ConfigError, match="prepared with tokenizer 'bytes' .* the model's is .*smollm2") as err:
        PreparedCorpus.open(prepared).check_tokenizer(load_tokenizer(ModelConfig(path="smollm2")))
    one_line(err)


def test_source_prepared_needs_its_paths():
    with pytest.raises(ConfigError, match="data.path: source 'prepared' needs"):
        config_from_dict({"data": {"source": "prepared"}})
    cfg = data_cfg("unused")
    with pytest.raises(ConfigError, match="data.eval_path: source 'prepared' needs a prepared held-out dir"):
        eval_batches(cfg, ByteTokenizer())


def test_every_epoch_is_a_seeded_permutation_of_all_windows(prepared):
    source = PreparedWindows(data_cfg(prepared), ByteTokenizer(), seed=3)
    n = len(source)
    epoch0 = [source.window_id(p) for p in range(n)]
    epoch1 = [source.window_id(p) for p in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    again = PreparedWindows(data_cfg(prepared), ByteTokenizer(), seed=3)
    assert [again.window_id(p) for p in range(2 * n)] == epoch0 + epoch1  # deterministic
    ordered = PreparedWindows(data_cfg(prepared, shuffle=False), ByteTokenizer(), seed=3)
    assert [ordered.window_id(p) for p in range(n)] == list(range(n))
    # a cursor past the end wraps into the next epochs deterministically
    assert source.window_id(5 * n + 7) == PreparedWindows(data_cfg(prepared), None, seed=3).window_id(5 * n + 7)


def pulls(path, world: int, n: int, **data) -> list[list[int]]:
    """The window ids of n micro-batch pulls of every rank, per pull (all ranks' windows together)."""
    per_rank = []
    for rank in range(world):
        batches = PackedBatches(data_cfg(path, prefetch=0, **data), ByteTokenizer(), rank, world, seed=1)
        source = batches.source
        rows = []
        for _ in range(n):
            start = batches.cursor + rank * batches.cfg.micro_batch_size
            batch = next(batches)
            ids = [source.window_id(p) for p in range(start, start + batches.cfg.micro_batch_size)]
            assert batch.tolist() == [source.view.read(i).tolist() for i in ids]
            rows.append(ids)
        per_rank.append(rows)
    return [sorted(i for rank in per_rank for i in rank[k]) for k in range(n)]


def test_the_windows_of_a_global_batch_do_not_depend_on_the_world_size(prepared):
    """Global batch = 4 windows: 2 ranks x micro-batch 2 x 1 pull, or 1 rank x micro-batch 2 x 2 pulls."""
    two_ranks = pulls(prepared, 2, 6)
    one_rank = pulls(prepared, 1, 12)
    assert two_ranks == [sorted(one_rank[2 * k] + one_rank[2 * k + 1]) for k in range(6)]


class NoTokenizer(ByteTokenizer):
    def __call__(self, *_a, **_k):
        raise AssertionError("prepared data must not tokenise")


def test_resume_reads_nothing_before_the_cursor(prepared):
    batches = PackedBatches(data_cfg(prepared, prefetch=0), NoTokenizer(), rank=1, world_size=2, seed=1)
    reference = PackedBatches(data_cfg(prepared, prefetch=0), NoTokenizer(), rank=1, world_size=2, seed=1)
    for _ in range(5000):  # a long run, consumed one pull at a time
        expected = next(reference)
    state = {**reference.state_dict(), "cursor": reference.cursor - reference.per_pull}
    batches.load_state_dict(state)
    assert next(batches).tolist() == expected.tolist()
    assert batches.source.view.reads == 2  # this rank's two windows of the one pull: none replayed
    assert batches.state_dict() == reference.state_dict() == {"cursor": 5000 * 4, "source": "prepared"}


def test_prefetch_gives_the_same_batches_and_reports_errors(prepared, corpus_files):
    direct = PackedBatches(data_cfg(prepared, prefetch=0), ByteTokenizer(), seed=2)
    ahead = PackedBatches(data_cfg(prepared, prefetch=3), ByteTokenizer(), seed=2)
    assert all(next(direct).tolist() == next(ahead).tolist() for _ in range(20))
    ahead.load_state_dict({"cursor": 7})
    direct.load_state_dict({"cursor": 7})
    assert next(direct).tolist() == next(ahead).tolist()
    ahead.close()
    empty = corpus_files.parent / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    streaming = PackedBatches(config_from_dict({"data": {"source": "files", "files": [str(empty)],
                                                         "prefetch": 2}}).data, ByteTokenizer())
    with pytest.raises(ConfigError, match="shorter than one window"):
        next(streaming)  # raised by the prefetch thread, re-raised here


def test_eval_windows_come_from_the_prepared_held_out_dir(prepared):
    cfg = config_from_dict({"data": {"source": "prepared", "path": str(prepared), "eval_path": str(prepared),
                                     "eval_seq_len": 16, "eval_batches": 4}}).data  # 4 windows in all
    rank1 = eval_batches(cfg, ByteTokenizer(), rank=1, world_size=2)
    tokens = np.load(prepared / "shard-00000.npy")
    assert [b.tolist() for b in rank1] == [[tokens[16:32].tolist()], [tokens[48:64].tolist()]]


@pytest.mark.parametrize("saved, world, micro, expect", [
    ((2, 2, 1), 1, 2, 2),   # 2 ranks x mb 2 x ga 1 -> 1 rank: ga 2
    ((1, 2, 4), 4, 2, 1),   # 1 rank x mb 2 x ga 4 -> 4 ranks: ga 1
    ((2, 2, 3), 2, 2, 3),   # same world size: untouched
])
def test_the_global_batch_is_kept_on_another_world_size(saved, world, micro, expect):
    saved_world, saved_mb, saved_ga = saved
    meta = {"world_size": saved_world, "config": {"data": {"micro_batch_size": saved_mb},
                                                  "optim": {"grad_accum": saved_ga}}}
    cfg = config_from_dict({"data": {"micro_batch_size": micro}, "optim": {"grad_accum": saved_ga}})
    out, note = keep_global_batch(cfg, meta, world)
    assert out.optim.grad_accum == expect
    assert (note is None) == (world == saved_world)


def test_an_impossible_global_batch_names_the_key():
    meta = {"world_size": 2, "config": {"data": {"micro_batch_size": 2}, "optim": {"grad_accum": 1}}}
    with pytest.raises(ConfigError, match="global batch of 4 windows .* set data.micro_batch_size to one of") as err:
        keep_global_batch(config_from_dict({"data": {"micro_batch_size": 3}}), meta, 1)
    one_line(err)
    with pytest.raises(ConfigError, match="resume on a number of ranks that divides 4"):
        keep_global_batch(config_from_dict({"data": {"micro_batch_size": 2}}), meta, 3)
