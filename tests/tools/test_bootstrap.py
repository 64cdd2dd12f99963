"""The NPT/base perplexity ratio's bootstrap interval, and the per-window NLL sums `evaluate` returns for it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npt_ds.tools.bootstrap import bootstrap_difference, bootstrap_ratio, ppl_ratio

BASE, NPT, TOK = [10.0, 12.0, 8.0, 14.0], [11.0, 12.0, 10.0, 15.0], [10, 10, 10, 10]


def test_ratio_by_hand():
    assert ppl_ratio(BASE, NPT, TOK) == pytest.approx(math.exp((48 - 44) / 40), rel=1e-15)
    # windows 0, 0, 1, 3: NPT 11+11+12+15 = 49, base 10+10+12+14 = 46, 40 tokens
    assert ppl_ratio(BASE, NPT, TOK, [[0, 0, 1, 3], [2, 2, 2, 2]]).tolist() == pytest.approx(
        [math.exp(3 / 40), math.exp(8 / 40)], rel=1e-15)


def test_interval_matches_a_loop_over_the_same_draws():
    ci = bootstrap_ratio(BASE, NPT, TOK, resamples=200, seed=3)
    draws = np.random.default_rng(3).integers(0, 4, size=(200, 4))
    reps = sorted(math.exp((sum(NPT[i] for i in d) - sum(BASE[i] for i in d)) / sum(TOK[i] for i in d))
                  for d in draws)

    def percentile(q):  # numpy's default (linear) quantile, written out
        pos = q * (len(reps) - 1)
        lo = math.floor(pos)
        return reps[lo] + (reps[min(lo + 1, len(reps) - 1)] - reps[lo]) * (pos - lo)

    assert (ci.low, ci.high) == pytest.approx((percentile(0.025), percentile(0.975)), rel=1e-12)
    assert ci.ratio == ppl_ratio(BASE, NPT, TOK) and ci.windows == 4 and ci.resamples == 200
    assert bootstrap_ratio(BASE, NPT, TOK, resamples=200, seed=3) == ci  # seeded: reproducible


def windows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.normal(4.0, 0.5, n) * 128
    return base, base + rng.normal(0.1, 0.2, n) * 128, [128] * n


def test_interval_holds_the_point_and_shrinks_with_more_windows():
    small, large = bootstrap_ratio(*windows(16)), bootstrap_ratio(*windows(512))
    for ci in (small, large):
        assert ci.low < ci.ratio < ci.high
    assert (large.high - large.low) < 0.4 * (small.high - small.low)  # ~ 1/sqrt(32) of it
    assert large.low < math.exp(0.1) < large.high  # the true ratio of the generator
    assert bootstrap_ratio(*windows(16), seed=1) != small  # the seed picks the draws


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="at least 2 windows"):
        bootstrap_ratio([1.0], [1.0], [1])
    with pytest.raises(ValueError, match="one of each per window"):
        bootstrap_ratio([1.0, 2.0], [1.0], [1, 1])


def test_paired_difference_cancels_the_windows_own_difficulty():
    base, npt, tok = windows(64)
    a = {"nll_base": list(base), "nll_npt": list(npt), "tokens": tok}
    b = {**a, "nll_npt": list(npt + 0.02 * 128)}  # every window 0.02 nats/token worse: the gap is exact
    diff = bootstrap_difference(b, a, resamples=500, seed=2)
    gap = ppl_ratio(base, npt + 0.02 * 128, tok) - ppl_ratio(base, npt, tok)
    assert diff.ratio == pytest.approx(gap, rel=1e-12) and diff.windows == 64
    # pairing leaves only the ratio's scale in the spread, far below the unpaired intervals' widths
    unpaired = bootstrap_ratio(base, npt, tok, resamples=500, seed=2)
    assert diff.low < diff.ratio < diff.high and (diff.high - diff.low) < 0.05 * (unpaired.high - unpaired.low)
    # the same draw for both: a loop over seed 2's indices gives the same interval
    draws = np.random.default_rng(2).integers(0, 64, size=(500, 64))
    reps = [ppl_ratio(base[d], npt[d] + 0.02 * 128, np.asarray(tok)[d]) - ppl_ratio(base[d], npt[d], np.asarray(tok)[d])
            for d in draws]
    assert (diff.low, diff.high) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), rel=1e-9)
    with pytest.raises(ValueError, match="scored other windows"):
        bootstrap_difference(a, {**a, "tokens": tok[:-1]})


def test_evaluate_per_window_sums_add_up_to_its_perplexities(tiny_model):
    from npt_ds.config import NPTConfig
    from npt_ds.train.evaluate import evaluate
    from npt_ds.model import convert_model

    torch.manual_seed(0)
    convert_model(tiny_model, NPTConfig(layers="2,3", rank=8))
    batches = [torch.randint(0, tiny_model.config.vocab_size, (2, 17)) for _ in range(3)]
    result = evaluate(tiny_model, batches, per_window=True)
    win = result["windows"]
    assert win["tokens"] == [16] * 6 and len(win["nll_base"]) == len(win["nll_npt"]) == 6
    assert math.exp(sum(win["nll_base"]) / 96) == pytest.approx(result["eval/ppl_base"], rel=1e-12)
    assert math.exp(sum(win["nll_npt"]) / 96) == pytest.approx(result["eval/ppl_npt"], rel=1e-12)
    assert win["nll_npt"] != win["nll_base"]
    assert "windows" not in evaluate(tiny_model, batches)


def test_cli_eval_data_on_files_and_a_prepared_dir(tmp_path, capsys):
    import json

    from npt_ds.cli import main
    from npt_ds.data.sources import shakespeare_split

    play = str(shakespeare_split(["tempest"])[1][0])
    assert main(["prepare", play, "--tokenizer", "tiny", "--workers", "1", "--no-progress",
                 "--out", str(tmp_path / "prep")]) == 0
    results = {}
    for name, spec in (("files", play), ("prepared", str(tmp_path / "prep"))):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", "tiny", "--layers", "2,3", "--data", spec, "--batches", "6",
                     "--seq-len", "32", "--bootstrap", "300", "--out", str(out)]) == 0
        r = results[name] = json.loads(out.read_text())
        assert r["eval/ppl_ratio"] == pytest.approx(r["eval/ppl_npt"] / r["eval/ppl_base"], rel=1e-9)
        assert r["eval/ppl_ratio_low"] < r["eval/ppl_ratio"] < r["eval/ppl_ratio_high"]
        assert len(r["windows"]["tokens"]) == 6
        ci = bootstrap_ratio(r["windows"]["nll_base"], r["windows"]["nll_npt"], r["windows"]["tokens"], 300, 0)
        assert (ci.low, ci.high) == (r["eval/ppl_ratio_low"], r["eval/ppl_ratio_high"])
    assert results["files"]["windows"] == results["prepared"]["windows"]  # the same windows either way
    text = capsys.readouterr().out
    assert f"prepared dir {tmp_path / 'prep'}, 6 windows" in text and "95% CI [" in text
    assert main(["eval", "--model", "tiny", "--data", str(tmp_path)]) == 2  # a dir that is not prepared
    assert "is a directory but not a prepared dir" in capsys.readouterr().err
    # --against: the paired difference from another evaluation of the same windows, in its output and file
    assert main(["eval", "--model", "tiny", "--layers", "2,3", "--data", play, "--batches", "6", "--seq-len", "32",
                 "--bootstrap", "300", "--modulation-scale", "1.0", "--against", str(tmp_path / "files.json"),
                 "--out", str(tmp_path / "other.json")]) == 0
    other = json.loads((tmp_path / "other.json").read_text())
    diff = bootstrap_difference(other["windows"], results["files"]["windows"], 300, 0)
    assert other["eval/ratio_minus_other"] == pytest.approx(other["eval/ppl_ratio"] - results["files"]["eval/ppl_ratio"])
    assert (other["eval/ratio_minus_other_low"], other["eval/ratio_minus_other_high"]) == (diff.low, diff.high)
    assert "paired bootstrap over the same 6 windows" in capsys.readouterr().out
    for bad, why in (("missing.json", "not found"), ("prep/index.json", "holds no per-window NLL sums")):
        assert main(["eval", "--model", "tiny", "--data", play, "--against", str(tmp_path / bad)]) == 2
        assert why in capsys.readouterr().err
