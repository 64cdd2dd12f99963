"""Peak-RSS probe run in a fresh process per variant (glibc keeps freed pages, so in-process RSS
deltas between variants are meaningless).

    python -m bench.probe step fused --shape smollm2 --seq 256 --batch 1 --dtype fp32 --threads 2

Prints one JSON line: RSS after setup (model + batch + one warm-up step, so the weights are paged
in and the optimizer state exists), peak RSS (VmHWM, reset via /proc/self/clear_refs just before the
measured steps) over `--steps` training steps, and their difference = the step's transient memory.
The parent runs it with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS at once
(glibc would otherwise keep them, hiding the warm-up step's transient memory from later steps).
"""
from __future__ import annotations

import argparse
import json

from .common import peak_rss_mb, reset_peak_rss, rss_mb, set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.probe")
    p.add_argument("what", choices=["step"])
    p.add_argument("variant")
    p.add_argument("--shape", default="smollm2")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--npt-layers", default=None)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    set_threads(args.threads)
    opts = argparse.Namespace(shape=args.shape, seq=args.seq, batch=args.batch, dtype=args.dtype, device="cpu",
                              num_layers=args.num_layers, npt_layers=args.npt_layers, rank=64, num_ranks=1, seed=0)
    from .step import StepBench

    bench = StepBench(opts)
    step = bench.steps[args.variant]
    rss_loaded = rss_mb()
    step()  # warm-up: page in the (memory-mapped) weights, allocate Adam state
    base = rss_mb()
    resettable = reset_peak_rss()
    for _ in range(args.steps):
        step()
    peak = peak_rss_mb()
    print(json.dumps({"rss_loaded_mb": round(rss_loaded, 1), "rss_setup_mb": round(base, 1),
                      "peak_rss_mb": round(peak, 1),
                      "rss_delta_mb": round(peak - base, 1) if resettable else None,
                      "rss_method": "VmHWM after clear_refs" if resettable else "ru_maxrss (not resettable)"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
