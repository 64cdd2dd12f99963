"""`evaluate` on uneven shares: a rank whose share is only padding all-reduces the same keys as the others."""
from __future__ import annotations

import pytest
import torch

from npt_ds.config import NPTConfig
from npt_ds.data.sources import EvalBatches
from npt_ds.model import convert_model
from npt_ds.train import evaluate as evaluate_module
from npt_ds.train.evaluate import evaluate


class Sent(Exception):
    pass


@pytest.fixture
def npt_model(tiny_model):
    torch.manual_seed(0)
    convert_model(tiny_model, NPTConfig(layers="2,3", rank=8))
    return tiny_model


def test_padding_batches_count_for_nothing(npt_model):
    real, pad = (torch.randint(0, npt_model.config.vocab_size, (2, 17)) for _ in range(2))
    assert evaluate(npt_model, EvalBatches([real], steps=3, pad=pad)) == evaluate(npt_model, [real])


def test_a_rank_holding_only_padding_reduces_the_same_keys(npt_model, monkeypatch):
    """One held-out window on two ranks: rank 1 runs only its pad batch.  Simulate the all-reduce of the two
    ranks and check the sum equals the one-rank result (before, rank 1 had no keys and failed on an empty stack)."""
    window = torch.randint(0, npt_model.config.vocab_size, (1, 17))
    sent = []

    def capture(values):  # rank 1's side: what it contributes (its own total has no tokens to divide by)
        sent.append(values)
        raise Sent

    monkeypatch.setattr(evaluate_module, "all_reduce_sum", capture)
    with pytest.raises(Sent):
        evaluate(npt_model, EvalBatches([], steps=1, pad=window))
    padding_only = sent.pop()
    assert all(v == 0 for v in padding_only)
    monkeypatch.setattr(evaluate_module, "all_reduce_sum",
                        lambda values: [a + b for a, b in zip(values, padding_only, strict=True)])
    two_ranks = evaluate(npt_model, EvalBatches([window], steps=1, pad=window))  # rank 0's share, reduced
    monkeypatch.undo()
    assert two_ranks == evaluate(npt_model, [window])
