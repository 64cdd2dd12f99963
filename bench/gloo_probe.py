"""Message bandwidth of an all-gather between two CPU processes over gloo on loopback (for the dist section's
step-time prediction): `python -m bench.gloo_probe [MB] [reps]` prints {"message_gb_per_s": ...}."""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, port: int, mb: float, reps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    part = torch.ones(int(mb * 1e6 / 4 / 2))  # fp32; the gathered message is `mb` MB
    full = torch.empty(part.numel() * 2)
    dist.all_gather_into_tensor(full, part)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_gather_into_tensor(full, part)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        out.put(full.numel() * 4 * reps / elapsed / 1e9)
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    from .dist import free_port

    mb, reps = (float(argv[0]) if argv else 64.0), (int(argv[1]) if len(argv) > 1 else 5)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, mb, reps, out)) for rank in range(2)]
    for p in procs:
        p.start()
    value = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    print(json.dumps({"message_gb_per_s": value, "message_mb": mb, "reps": reps}))


if __name__ == "__main__":
    main(sys.argv[1:])
