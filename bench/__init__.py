"""npt-ds benchmarks: `python -m bench.run [--only micro,step,dist] [--quick] [--repeats N]` (or `make bench`).

micro  -- NPT modulated MLP vs plain LlamaMLP vs naive per-token ΔW (bench/micro.py)
step   -- fused NPT training step vs a two-pass teacher/student reference vs plain fwd+bwd (bench/step.py)
dist   -- the real trainer under DeepSpeed ZeRO-3 / ZeRO-2 / one rank, trace and host-sync checks (bench/dist.py)
Results go to bench/results/<name>.json; a table is printed.
"""
