"""Synthetic metric streams: a realistic converging NPT run, with optional faults.

Used by the tests, ``bench/monitor_bench.py`` and for demos::

    python -m npt_monitor.synth runs/demo/metrics.jsonl --steps 2000 --rate 20 \\
        --nan-at 300 --kl-at 500=9.4 --oscillate 800:900

appends lines at ``--rate`` lines/s (0 = all at once).

The loss shapes the alert fixtures need: ``jitter`` (the issue's "+-a %": loss = trend x (1 + u), u uniform in
[-a, a], one draw per train line; piecewise, so the noise can jump), ``flip_flop`` (a swing of any period from 2,
sampled once per step) and ``drift`` (slow waves that follow the order of the streamed text: smoothed white noise,
no fixed period).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["synth_records", "synth_lines", "write_synth"]


def synth_records(
    n: int,
    *,
    seed: int = 0,
    run_name: str = "npt-demo",
    total_steps: int | None = None,
    n_layers: int = 4,
    layer_every: int = 1,
    eval_every: int = 0,
    checkpoint_every: int = 0,
    start: bool = True,
    end: bool = False,
    noise: float = 0.01,
    nan_at: tuple[int, ...] | set[int] = (),
    kl_at: dict[int, float] | None = None,
    grad_spike_at: dict[int, float] | None = None,
    oscillate: tuple[int, int] | None = None,
    osc_amplitude: float = 0.25,
    osc_period: int = 8,
    jitter: Sequence[tuple[int, float]] = (),
    flip_flop: tuple[int, int] | None = None,
    flip_amplitude: float = 0.5,
    drift: tuple[float, float] | None = None,
    t0: float = 1_700_000_000.0,
    step_time: float = 0.8,
) -> Iterator[dict]:
    """Yield ``n`` step lines (plus start/eval/checkpoint/end lines) as dicts,
    shaped like ``npt_ds.train.trainer`` writes them (``time`` first, ``event`` set).

    Loss converges as ``2 + 6 exp(-3 t / n)`` with multiplicative noise; the
    curriculum goes teacher -> mixed (ratio ramps 0..1) -> student.

    * ``jitter``: ``((from_step, a), ...)``: from each ``from_step`` on, the noise is uniform +-a
      (loss = trend x (1 + u), u in [-a, a], one draw per train line) instead of ``noise``'s Gaussian.
    * ``flip_flop``: ``(from_step, period)``: loss x (1 + ``flip_amplitude`` x w), w the wave
      sin(2 pi (k + phi) / period) at step k since from_step, phi = 1/4 for an even period (no sample on a zero
      crossing), scaled so its extremes are +-1: period 2 is +a, -a, ...; period 3 is 0, +a, -a, ...
    * ``drift``: ``(std, period)``: loss x (1 + d), d white noise smoothed by a Gaussian of width
      period / (2 pi sqrt 2) steps (its waves' mean length, zero crossing to zero crossing twice, is then
      ``period``), scaled to standard deviation ``std``: the difficulty of text streamed in order, which drifts
      in waves of no fixed period.
    """
    rng = random.Random(seed)
    total = total_steps or n
    kl_at = kl_at or {}
    grad_spike_at = grad_spike_at or {}
    nan_at = set(nan_at)
    tau = max(1.0, n / 3.0)
    jitter = sorted(jitter)
    flip = _flip_wave(flip_flop[1]) if flip_flop else ()
    waves = _drift_waves(rng, n, *drift) if drift else None
    skipped = 0
    if start:
        yield {
            "time": t0,
            "step": 0,
            "event": "start",
            "run/name": run_name,
            "run/total_steps": total,
            "run/world_size": 2,
            "run/npt_layers": ",".join(str(i) for i in range(n_layers)),
        }
    for i in range(n):
        step = i + 1
        frac = step / total
        now = round(t0 + step * step_time, 3)
        if step in nan_at:
            skipped += 1
            yield {"time": now, "step": step, "event": "nan_step", "skipped_steps": skipped, "loss/total": math.nan}
            continue
        base = 2.0 + 6.0 * math.exp(-step / tau)
        amp = next((a for s, a in reversed(jitter) if s <= step), None)
        loss = base * (1.0 + (noise * rng.gauss(0.0, 1.0) if amp is None else rng.uniform(-amp, amp)))
        if flip_flop and step >= flip_flop[0]:
            loss *= 1.0 + flip_amplitude * flip[(step - flip_flop[0]) % len(flip)]
        if waves is not None:
            loss *= 1.0 + waves[i]
        if oscillate and oscillate[0] <= step < oscillate[1]:
            loss *= 1.0 + osc_amplitude * math.sin(2 * math.pi * (step - oscillate[0]) / osc_period)
        if frac < 0.2:
            stage, mix = "teacher", 0.0
        elif frac < 0.6:
            stage, mix = "mixed", (frac - 0.2) / 0.4
        else:
            stage, mix = "student", 1.0
        kd_w = 0.5 * (1.0 - 0.5 * frac)
        kl = kl_at.get(step, 0.3 + 2.5 * math.exp(-step / tau) * (1 + 0.05 * rng.gauss(0, 1)))
        grad = grad_spike_at.get(step, (0.8 + 1.5 * math.exp(-step / tau)) * (1 + 0.1 * abs(rng.gauss(0, 1))))
        direct = 0.45 * loss
        kd = kd_w * kl
        rec = {
            "time": now,
            "step": step,
            "event": "train",
            "lr": round(3e-4 * min(1.0, step / 100) * (0.5 + 0.5 * math.cos(math.pi * frac)), 8),
            "loss/total": round(loss, 6),
            "loss/direct": round(direct, 6),
            "loss/reg": round(0.01 * (1 + 0.1 * rng.random()), 6),
            "loss/fidelity": round(0.3 * loss, 6),
            "loss/kd": round(kd, 6),
            "loss/guidance/attn": round(0.05 * loss * (1 + 0.05 * rng.random()), 6),
            "kd/kl": round(kl, 5),
            "kd/weight": round(kd_w, 5),
            "curriculum/stage": stage,
            "curriculum/mixing_ratio": round(mix, 4),
            "grad_norm": round(grad, 5),
            "tokens_per_s": round(12000 * (1 + 0.02 * rng.gauss(0, 1)), 1),
            "eta_s": round((total - step) * step_time, 1),
            "skipped_steps": skipped,
            "tokens": step * 16384,
        }
        if n_layers and step % layer_every == 0:
            for layer in range(n_layers):
                d = 0.02 * math.exp(-step / tau) * (1 + 0.3 * layer) + 0.001
                rec[f"layer/{layer}/direct_mse"] = round(d * (1 + 0.05 * rng.random()), 7)
                rec[f"layer/{layer}/v_a_norm"] = round(1.2 + 0.1 * layer + 0.02 * rng.random(), 5)
                rec[f"layer/{layer}/v_b_norm"] = round(0.8 - 0.05 * layer + 0.02 * rng.random(), 5)
                rec[f"layer/{layer}/v_a_attn_sim"] = round(0.9 - 0.3 * math.exp(-step / tau) - 0.02 * layer, 5)
        yield rec
        if eval_every and step % eval_every == 0:
            yield {
                "time": now,
                "event": "eval",
                "step": step,
                "eval/ppl_base": 12.5,
                "eval/ppl_npt": round(12.5 * (1 + 2 * math.exp(-step / tau)), 4),
                "eval/fidelity_mse": round(0.05 * math.exp(-step / tau) + 0.002, 6),
                **{f"eval/layer/{layer}/direct_mse_{proto}": round(
                    0.02 * math.exp(-step / tau) * (1 + 0.3 * layer) * (1 + 0.5 * layer * (proto == "student_in"))
                    + 0.001, 7) for layer in range(n_layers) for proto in ("teacher_in", "student_in")},
            }
        if checkpoint_every and step % checkpoint_every == 0:
            yield {"time": now, "step": step, "event": "checkpoint", "path": f"checkpoints/step-{step:08d}"}
    if end:
        yield {"time": round(t0 + n * step_time, 3), "step": n, "event": "end", "skipped_steps": skipped}


def _flip_wave(period: int) -> list[float]:
    """One period of the flip-flop wave, extremes +-1 (see :func:`synth_records`)."""
    phase = 0.25 if period % 2 == 0 else 0.0
    wave = [math.sin(2 * math.pi * (k + phase) / period) for k in range(period)]
    top = max(abs(v) for v in wave)
    return [v / top for v in wave]


def _drift_waves(rng: random.Random, n: int, std: float, period: float) -> list[float]:
    """``n`` values of white noise smoothed by a Gaussian kernel, scaled to standard deviation ``std``.

    For a Gaussian kernel of width s the smoothed noise crosses zero 1 / (pi s sqrt 2) times per step (Rice's
    formula), so its waves last 2 pi s sqrt 2 steps on average: s = period / (2 pi sqrt 2)."""
    s = max(period / (2 * math.pi * math.sqrt(2)), 0.5)
    half = int(4 * s) + 1
    kernel = [math.exp(-0.5 * (j / s) ** 2) for j in range(-half, half + 1)]
    white = [rng.gauss(0.0, 1.0) for _ in range(n + 2 * half)]
    smooth = [sum(k * w for k, w in zip(kernel, white[i : i + len(kernel)])) for i in range(n)]
    mean = sum(smooth) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in smooth) / n) or 1.0
    return [std * (v - mean) / sd for v in smooth]


def synth_lines(n: int, **kwargs) -> list[str]:
    """Lines (without newline) of :func:`synth_records`."""
    return [json.dumps(r) for r in synth_records(n, **kwargs)]


def write_synth(path: str | Path, n: int, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for line in synth_lines(n, **kwargs):
            fh.write(line + "\n")
    return path


def _kv(text: str) -> tuple[int, float]:
    k, v = text.split("=")
    return int(k), float(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m npt_monitor.synth", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=0.0, help="lines per second (0: write all at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="npt-demo")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--nan-at", type=int, action="append", default=[])
    ap.add_argument("--kl-at", type=_kv, action="append", default=[], metavar="STEP=KL")
    ap.add_argument("--grad-spike-at", type=_kv, action="append", default=[], metavar="STEP=NORM")
    ap.add_argument("--oscillate", default=None, metavar="START:END")
    ap.add_argument("--jitter", type=_kv, action="append", default=[], metavar="STEP=A",
                    help="from STEP on, uniform +-A noise (A=0.4: +-40 %%)")
    ap.add_argument("--flip-flop", default=None, metavar="STEP:PERIOD", help="a +-50 %% swing of PERIOD from STEP")
    ap.add_argument("--drift", default=None, metavar="STD:PERIOD", help="slow waves that follow the data")
    ap.add_argument("--append", action="store_true", help="append instead of truncating OUT")
    args = ap.parse_args(argv)
    osc = tuple(int(x) for x in args.oscillate.split(":")) if args.oscillate else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = synth_records(
        args.steps,
        seed=args.seed,
        run_name=args.name,
        n_layers=args.layers,
        eval_every=args.eval_every,
        nan_at=set(args.nan_at),
        kl_at=dict(args.kl_at),
        grad_spike_at=dict(args.grad_spike_at),
        oscillate=osc,  # type: ignore[arg-type]
        jitter=args.jitter,
        flip_flop=tuple(int(x) for x in args.flip_flop.split(":")) if args.flip_flop else None,  # type: ignore[arg-type]
        drift=tuple(float(x) for x in args.drift.split(":")) if args.drift else None,  # type: ignore[arg-type]
    )
    with open(out, "a" if args.append else "w") as fh:
        t_next = time.monotonic()
        for rec in gen:
            fh.write(json.dumps(rec) + "\n")
            if args.rate > 0:
                fh.flush()
                t_next += 1.0 / args.rate
                delay = t_next - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
