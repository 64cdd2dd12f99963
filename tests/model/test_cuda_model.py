"""CUDA against CPU fp32: folding a context into W_gate.  The tools hold the model in fp32, so the fold itself is
compared in fp32 (relative 1e-4: only the kernels' summation order differs); the deltas a bf16 model would fold
are compared within 5 % (1.6 % on a bf16 CPU).
"""
from __future__ import annotations

import pytest
import torch

from support.cuda import on, rel_err
from npt_ds.model import context_deltas, fold_context, set_mode

from support.npt import strong_npt

pytestmark = pytest.mark.cuda
CONTEXT = torch.tensor([list(b"The capital of Veloria is Marthenby.")])


def test_fold_on_cuda(cuda_device):
    model = strong_npt(dual=True).float()
    device_model = on(model, cuda_device, torch.float32)
    want = fold_context(model, CONTEXT, positions=[2, 5, 9])
    got = fold_context(device_model, CONTEXT.to(cuda_device), positions=[2, 5, 9])
    assert set(got) == set(want) and any(name.endswith("gate_proj.weight") for name in want)
    for name, delta in want.items():
        assert rel_err(got[name], delta) < 1e-4, name
    ids = torch.tensor([list(b"Where is Marthenby?")])
    set_mode(model, "student"), set_mode(device_model, "student")
    with torch.no_grad():
        assert rel_err(device_model(input_ids=ids.to(cuda_device)).logits, model(input_ids=ids).logits) < 1e-4


def test_bf16_context_deltas_on_cuda(cuda_device):
    model = strong_npt(dual=True).float()
    want = context_deltas(model, CONTEXT, positions="all")
    got = context_deltas(on(model, cuda_device, torch.bfloat16), CONTEXT.to(cuda_device), positions="all")
    for name, delta in want.items():
        assert rel_err(got[name], delta) < 0.05, name  # bf16 vectors: within 5 %
