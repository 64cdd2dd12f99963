"""Process-group setup for one process or a DeepSpeed launch, and the few collectives the loop needs."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from .rank_stats import WAIT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed via DeepSpeed; works with or without the launcher. -> (rank, world)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m npt_ds.train`: a world of one on loopback
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():  # before any CUDA allocation: rank r computes (and bitsandbytes loads) on GPU r
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        backend = "gloo" if not torch.cuda.is_available() else None
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def local_rank() -> int:
    """This process's GPU index on its node (the launcher's LOCAL_RANK; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def any_rank_true(flag: bool | torch.Tensor) -> bool:
    """True on every rank if `flag` is true on any rank: one 1-element all-reduce, one host read."""
    t = flag.detach().reshape(1).float() if torch.is_tensor(flag) else \
        torch.tensor([1.0 if flag else 0.0], device=_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        WAIT.timed(dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """Tear the process group down in order before the process exits (every rank, after the last collective)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
