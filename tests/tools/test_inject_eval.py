"""inject-eval: facts validation, measurements that move only when an injection does, best-alpha choice."""
from __future__ import annotations

import json

import pytest
import torch

from npt_ds.model import ByteTokenizer
from npt_ds.tools.inject_eval import answer_score, best_alpha, load_facts, run_inject_eval, table

from support.npt import strong_npt

FACT = {"id": "f", "context": "Veloria's capital is Marthenby.", "prompts": ["The capital of Veloria is"],
        "paraphrases": ["Veloria has its capital at"], "answer": " Marthenby",
        "controls": [{"prompt": "The capital of France is", "answer": " Paris"}]}


def test_shipped_facts_load():
    facts = load_facts(["data/facts/fictional.jsonl"])
    assert len(facts) == 20 and len({f["id"] for f in facts}) == 20


@pytest.mark.parametrize("line,msg", [("{", "f.jsonl:1: not JSON"),
                                      (json.dumps({**FACT, "answer": ""}), "f.jsonl:1: key 'answer' must be a non-empty str"),
                                      (json.dumps({**FACT, "controls": [{"prompt": "x"}]}), "each control needs")])
def test_bad_fact_lines_are_one_line_errors(tmp_path, line, msg):
    (tmp_path / "f.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=msg):
        load_facts([str(tmp_path / "f.jsonl")])


def test_answer_score_is_the_teacher_forced_log_probability_and_rank():
    model = strong_npt().float()
    tok = ByteTokenizer()
    logp, rank = answer_score(model, tok, "ab", "cd")
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([list(b"abcd")])).logits[0].double(), -1)
    assert logp == pytest.approx(float(lp[1, ord("c")] + lp[2, ord("d")]), abs=1e-9)
    assert rank == int((lp[1] > lp[1, ord("c")]).sum()) + 1


def test_alpha_zero_changes_nothing_and_injections_are_undone():
    model = strong_npt().float()
    res = run_inject_eval(model, ByteTokenizer(), [FACT, {**FACT, "id": "g"}], [0.0, 3.0, 0.0], layers=None,
                          positions="last", ppl_batches=1, ppl_seq_len=32, log=lambda *_: None)
    zero, strong, zero_again = res["alphas"]
    assert zero["ppl_damage_pct"] == 0.0 and zero["control_dlogp_abs_mean"] == 0.0
    assert zero["question_logp_mean"][0] == zero["question_logp_mean"][1]
    assert strong["control_dlogp_abs_mean"] > 1e-3 and strong["question_logp_mean"][1] != strong["question_logp_mean"][0]
    assert zero_again == zero  # every injection was undone exactly
    assert model.npt_injections.records == []
    assert any("alpha" in line for line in table(res))


def test_best_alpha_is_the_largest_gain_within_the_damage_budget():
    rows = [{"alpha": 0.5, "rank_gain": 1.5, "ppl_damage_pct": 0.4}, {"alpha": 1.0, "rank_gain": 2.5, "ppl_damage_pct": 1.9},
            {"alpha": 2.0, "rank_gain": 9.0, "ppl_damage_pct": 7.0}]
    assert best_alpha(rows) == 1.0
    assert best_alpha([rows[2]]) is None
