"""Document boundaries and held-out data: one BOS per document in `prepare` as in the streaming sources, no
evaluation on training text, and the same eval windows on any world size."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from npt_ds.cli import main as npt_ds
from npt_ds.config import ConfigError, ModelConfig, config_from_dict
from npt_ds.data.sources import EvalBatches, document_markers, document_source, eval_batches, token_windows
from npt_ds.model import ByteTokenizer, load_tokenizer

BOS, EOS = "<s>", "</s>"


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory):
    """A byte-level tokenizer that starts every text with BOS, as Llama-3's does (an HF dir `prepare` loads)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {BOS: 0, EOS: 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    out = tmp_path_factory.mktemp("bos-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS).save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    docs = [f"Document {d}.\n" + "".join(f"line {i} of document {d}\n" for i in range(40 * (d + 1)))
            for d in range(3)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in docs))
    return path, docs


@pytest.mark.parametrize("workers", ["1", "2"])
def test_prepare_puts_one_bos_per_document_however_it_is_cut(bos_tokenizer_dir, long_documents, tmp_path,
                                                              monkeypatch, workers):
    import npt_ds.data.prepare as prep

    monkeypatch.setattr(prep, "PIECE_CHARS", 200)  # every document is tokenised in many pieces
    path, docs = long_documents
    out = tmp_path / "prep"
    assert npt_ds(["prepare", str(path), "--tokenizer", str(bos_tokenizer_dir), "--out", str(out),
                   "--no-progress", "--workers", workers]) == 0
    index = json.loads((out / "index.json").read_text())
    tokens = np.concatenate([np.load(out / s["file"]) for s in index["shards"]]).tolist()
    tokenizer = load_tokenizer(ModelConfig(path=str(bos_tokenizer_dir)))
    assert document_markers(tokenizer) == ([0], [1])
    assert tokens.count(0) == len(docs) and tokens.count(1) == len(docs)
    assert tokens == [t for text in docs for t in tokenizer(text)["input_ids"] + [1]]  # BOS + text + EOS each

    ds, key = document_source(config_from_dict({"data": {"source": "files", "files": [str(path)],
                                                         "eval_files": [str(path)]}}).data, "train")
    windows = list(token_windows(ds, key, tokenizer, 64))
    assert [t for w in windows for t in w] == tokens[: 64 * len(windows)]  # streaming reads the same tokens


def test_a_tokenizer_without_bos_gets_eos_only():
    assert document_markers(ByteTokenizer()) == ([], [256])


def test_the_last_file_is_held_out_of_training_when_no_eval_files_are_named(tmp_path):
    files = []
    for name in ("a", "b", "c"):
        files.append(tmp_path / f"{name}.txt")
        files[-1].write_text(f"text of {name}\n")
    cfg = config_from_dict({"data": {"source": "files", "files": [str(f) for f in files]}}).data
    train, _ = document_source(cfg, "train")
    held, _ = document_source(cfg, "eval")
    assert [r["text"] for r in train] == ["text of a\n", "text of b\n"]
    assert [r["text"] for r in held] == ["text of c\n"]
    named = config_from_dict({"data": {"source": "files", "files": [str(f) for f in files[:2]],
                                       "eval_files": [str(files[2])]}}).data
    assert [r["text"] for r in document_source(named, "train")[0]] == ["text of a\n", "text of b\n"]


def test_one_file_and_no_eval_files_is_refused_in_one_line(tmp_path):
    (tmp_path / "only.txt").write_text("all the text there is\n" * 50)
    cfg = config_from_dict({"data": {"source": "files", "files": [str(tmp_path / "only.txt")],
                                     "eval_seq_len": 16, "eval_batches": 1}}).data
    with pytest.raises(ConfigError) as err:
        eval_batches(cfg, ByteTokenizer())
    assert "\n" not in str(err.value) and str(err.value).startswith("data.eval_files:")


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_eval_windows_are_the_same_set_on_any_world_size(world):
    cfg = config_from_dict({"data": {"eval_seq_len": 32, "eval_batches": 4}}).data
    everything = eval_batches(cfg, ByteTokenizer())
    shares = [eval_batches(cfg, ByteTokenizer(), rank=r, world_size=world) for r in range(world)]
    assert len(everything) == 4
    got = sorted(b.tolist() for share in shares for b in share)
    assert got == sorted(b.tolist() for b in everything)
    assert all(isinstance(s, EvalBatches) and s.steps == -(-4 // world) for s in shares)  # equal forwards per rank
