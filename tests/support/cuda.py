"""The CUDA tests (`pytest -m cuda`, run by `make gpu-check`): a device under test and the comparisons they share.

Each test runs a path on the device (CUDA, bf16 where a recipe trains in bf16) and on the CPU in fp32, and asserts
the two agree within a stated tolerance.  Without CUDA they skip, unless ``NPT_DS_CUDA_TESTS_DEVICE=cpu`` names
another device under test: the same comparisons then run bf16-on-CPU against fp32-on-CPU, which checks the tests
themselves (and their tolerances) where no GPU is.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

DEVICE_ENV = "NPT_DS_CUDA_TESTS_DEVICE"


def device_under_test() -> torch.device:
    forced = os.environ.get(DEVICE_ENV)
    if forced:
        return torch.device(forced)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA (set NPT_DS_CUDA_TESTS_DEVICE=cpu to run these comparisons with a bf16 CPU)")
    return torch.device("cuda")


def on(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` (weights, NP components, injections) on `device` in `dtype`."""
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ over every element, in fp64 on the host."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def cosine(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu().flatten(), want.detach().double().cpu().flatten()
    return float(torch.nn.functional.cosine_similarity(got, want, dim=0))


def assert_close_rel(got: float, want: float, tol: float, what: str) -> None:
    err = abs(got - want) / max(abs(want), 1e-12)
    assert err <= tol, f"{what}: {got:.6g} vs fp32 CPU {want:.6g} (relative error {err:.2e} > {tol})"
