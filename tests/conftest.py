"""Shared fixtures: single-threaded torch, a tiny Llama, a free port for DeepSpeed."""
from __future__ import annotations

import os
import socket

import pytest
import torch

torch.set_num_threads(int(os.environ.get("NPT_TEST_THREADS", "1")))


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launcher_variables_left_behind():
    """An in-process trainer sets RANK=0 WORLD_SIZE=1 MASTER_ADDR/PORT for its world of one; later tests that start
    launchers (Slurm, ssh hosts) must not inherit them."""
    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def tiny_model():
    from npt_ds.model import tiny_llama

    return tiny_llama()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cuda_device() -> torch.device:
    """The device the `cuda`-marked tests compare against fp32 CPU (tests/support/cuda.py); skips without CUDA."""
    from support.cuda import device_under_test

    return device_under_test()
