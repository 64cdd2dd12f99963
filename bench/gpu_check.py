"""`make gpu-check`: prove a GPU node in minutes and measure the stack on it (one CUDA GPU, no network).

    python -m bench.gpu_check [--out bench/results/gpu] [--parts env,tests,speed,step,numerics,bnb]
    python -m bench.gpu_check --cpu-smoke          # every part with tiny shapes on the CPU (what CI runs)

A script under bench/, not an `npt-ds doctor` command: it drives the test suite (tests/ is not installed),
measures the way `make bench` does (bench/common.py, bench/step.py, bench/dist_worker.py) and writes into
bench/results/; none of that belongs in the installed package.  Parts (``--parts`` takes names or numbers):

1. ``env``: torch, CUDA, NCCL, DeepSpeed, transformers, bitsandbytes, ...; the GPU, its memory, bf16.
2. ``tests``: ``pytest -m cuda`` on tests/**/test_cuda_*.py (CUDA bf16 asserted against CPU fp32; skip without CUDA).
3. ``speed``: the trainer under DeepSpeed ZeRO-3 (resident / partitioned) and ZeRO-2 on one GPU, Llama 1B and
   8B shapes with random weights, against `npt-ds plan`; the CUDA-event clock of rank/{r}/step_s (bench/gpu_speed.py).
4. ``step``: the fused step vs two-pass vs a plain forward+backward (bench/step.py on the GPU).
5. ``numerics``: how much of the NP update survives bf16, fp32_update off and on (bench/numerics.py).
6. ``bnb``: a training step on an nf4 and an int8 base (when bitsandbytes imports).

It writes ``OUT/<gpu>-<date>.json`` (again after every part and every training run, so a run cut short keeps
what it measured) and ``OUT/<gpu>-<date>.md``, a readable summary with the issue's targets.  Without CUDA it
refuses unless ``--cpu-smoke``, where the parts that need CUDA say "skipped: no CUDA".
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import torch

from .common import REPO_ROOT, env_info, format_table, target
from .gpu_speed import GPU_RUNS, SMOKE_RUNS, run_one, write_random_corpus, zero3_over_zero2

PARTS = ("env", "tests", "speed", "step", "numerics", "bnb")
VERSIONS = ("torch", "deepspeed", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface-hub",
            "pydantic", "numpy", "pytest", "bitsandbytes")
MIN_TORCH = (2, 9)
TARGET_RUN = GPU_RUNS[0].name  # 8B, upper half, ZeRO-3 resident, seq 4096: the targets


# ------------------------------------------------------------------------------------------------ report
class Report:
    """The JSON and the summary, rewritten whole after every part (and every training run)."""

    def __init__(self, out_dir: Path, stem: str, meta: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        n, base = 1, stem
        while (out_dir / f"{stem}.json").exists():  # never overwrite an earlier run's files
            n += 1
            stem = f"{base}-{n}"
        self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        self.data = {"check": meta, "parts": {}, "targets": {}}

    def save(self) -> None:
        self.data["targets"] = targets(self.data["parts"], self.data["check"]["cpu_smoke"])
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.json_path)
        self.md_path.write_text(summary(self.data))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------------------------------------ parts
def part_env(opts) -> dict:
    info = env_info(opts.device)
    versions, where = {}, {}
    for dist in VERSIONS:
        try:
            versions[dist] = md.version(dist)
            where[dist] = str(md.distribution(dist).locate_file(""))
        except md.PackageNotFoundError:
            versions[dist] = None
    out = {"status": "ok", **info, "versions": versions, "installed_under": where,
           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    torch_version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    out["torch_ok"] = torch_version >= MIN_TORCH
    from npt_ds.parallel.devices import peak_tflops, resolve_precision

    out["precision_auto"] = list(resolve_precision("auto"))
    out["peak_tflops"], out["peak_source"] = peak_tflops(0.0)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_mem_gib=round(props.total_memory / 2**30, 2), capability=f"{props.major}.{props.minor}",
                   bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                   cudnn=torch.backends.cudnn.version())
    try:
        import bitsandbytes  # noqa: F401 - whether part 6 can run

        out["bitsandbytes_imports"] = True
    except Exception as exc:  # noqa: BLE001 - absent or broken: recorded, part 6 skips
        out["bitsandbytes_imports"] = False
        out["bitsandbytes_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["lines"] = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), DeepSpeed {versions['deepspeed']}, "
                    f"transformers {versions['transformers']}, bitsandbytes {versions['bitsandbytes'] or 'absent'}",
                    f"device: {out.get('gpu', platform.processor() or 'CPU')}"
                    + (f", {out['gpu_mem_gib']} GiB, bf16 {out['bf16']}, NCCL {out['nccl']}" if "gpu" in out else "")
                    + f"; precision auto -> {out['precision_auto'][0]}"]
    if not out["torch_ok"] and not opts.cpu_smoke:
        out["status"] = "failed"
        out["lines"].append(f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}")
    return out


def part_tests(opts) -> dict:
    """`pytest -m cuda` in a child process; in the CPU smoke only collected (they skip without CUDA)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE"]
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # the image's own pytest plugins stay out
    try:
        import pytest_timeout  # noqa: F401 - pyproject sets `timeout`; the plugin reads it

        cmd += ["-p", "pytest_timeout"]
    except ImportError:
        pass
    if not torch.cuda.is_available():
        cmd.append("--collect-only")
    cmd += sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").rglob("test_cuda_*.py"))
    with tempfile.TemporaryDirectory(prefix="npt-gpu-tests-") as tmp:
        xml = Path(tmp) / "junit.xml"
        try:
            proc = subprocess.run(cmd + [f"--junitxml={xml}"], cwd=REPO_ROOT, env=env, text=True,
                                  capture_output=True, timeout=opts.tests_timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "cmd": " ".join(cmd),
                    "lines": [f"pytest -m cuda did not finish in {opts.tests_timeout} s"]}
        out = {"cmd": " ".join(cmd), "rc": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:]}
        if not torch.cuda.is_available():
            found = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)
            out.update(status="skipped", reason="no CUDA", collected=int(found.group(1)) if found else 0)
            out["lines"] = [f"skipped: no CUDA ({out['collected']} cuda tests collected)"]
            if proc.returncode not in (0, 5) or not out["collected"]:
                out.update(status="failed", lines=[f"the cuda tests do not collect (rc {proc.returncode})"])
            return out
        counts, failed = junit_counts(xml)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    out.update(counts, passed=passed, failed_tests=failed,
               status="ok" if proc.returncode == 0 and passed > 0 else "failed")
    out["lines"] = [f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"]
    out["lines"] += [f"FAILED {f['test']}: {f['message'][:160]}" for f in failed]
    return out


def junit_counts(xml: Path) -> tuple[dict, list[dict]]:
    """pytest's JUnit XML -> ({tests, failures, errors, skipped}, [{test, message} of each failure or error])."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if not xml.is_file():
        return counts, failed
    root = ET.parse(xml).getroot()
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:500]})
    return counts, failed


def part_speed(opts, report: Report) -> dict:
    runs = SMOKE_RUNS if opts.cpu_smoke else GPU_RUNS
    if opts.speed_runs:
        wanted = set(opts.speed_runs.split(","))
        runs = [r for r in runs if r.name in wanted]
    work = Path(tempfile.mkdtemp(prefix="npt-gpu-speed-"))
    out = {"status": "running", "runs": [], "config": {"seq": opts.speed_seq, "steps": opts.speed_steps,
                                                       "warmup": opts.speed_warmup, "precision": opts.precision}}
    try:
        corpus = write_random_corpus(work / "corpus", tokens=opts.speed_seq * 64)
        for run in runs:
            print(f"   {run.name} ...", flush=True)
            out["runs"].append(run_one(run, work, corpus, opts))
            report.data["parts"]["speed"] = out
            report.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["zero3_resident_over_zero2"] = zero3_over_zero2(out["runs"])
    first = out["runs"][0] if out["runs"] else {}
    if torch.cuda.is_available():
        out["clock"] = {"run": first.get("run"), "stream_over_host": first.get("clock_stream_over_host"),
                        "stream_own_s": first.get("clock_stream_own_s"), "host_own_s": first.get("clock_host_own_s")}
    else:
        out["clock"] = {"skipped": "no CUDA", "host_own_s": first.get("clock_host_own_s")}
    out["status"] = "ok" if out["runs"] and all(r["rc"] == 0 and r.get("steady_lines") for r in out["runs"]) \
        else "failed"
    cols = [("run", "run", ""), ("rc", "rc", "d"), ("s/step", "step_s", ".4f"), ("tok/s", "tokens_per_s", ",.0f"),
            ("MFU", "mfu", ".3f"), ("peak GB", "peak_mem_gb", ".2f"), ("step/plan", "step_over_planner", ".2f"),
            ("mem/plan", "mem_over_planner", ".2f"), ("loss last", "loss_last", ".4g")]
    out["lines"] = format_table(out["runs"], cols).splitlines()
    out["lines"] += [f"ZeRO-3 resident / ZeRO-2 tokens/s, {k}: {v:.3f}" for k, v in
                     out["zero3_resident_over_zero2"].items()]
    clock = out["clock"]
    out["lines"].append("stream clock: skipped: no CUDA" if "skipped" in clock else
                        f"stream clock / (wall - collective time), {clock['run']}: {clock['stream_over_host']}")
    out["lines"] += [f"{r['run']} FAILED (rc {r['rc']}): {r.get('error_tail', '')[-300:]}" for r in out["runs"]
                     if r["rc"] != 0]
    return out


def part_step(opts) -> dict:
    from .run import build_parser, resolve
    from .step import print_step, run_step

    cuda = torch.cuda.is_available()
    args = ["--only", "step", "--device", opts.device, "--dtype", "bf16" if cuda else "fp32",
            "--shape", opts.step_shape, "--seq", str(opts.step_seq), "--npt-layers", opts.step_layers,
            "--repeats", str(opts.step_repeats), "--step-best-of", "1", "--no-rss-probe",
            "--step-variants", "fused,two_pass,two_pass_reuse,plain,teacher_fwd"]
    if opts.peak_tflops:
        args += ["--peak-tflops", str(opts.peak_tflops)]
    if not cuda:
        args.append("--no-memory")
    res = run_step(resolve(build_parser().parse_args(args)))
    return {"status": "ok", **res, "lines": print_step(res).splitlines()}


def part_numerics(opts) -> dict:
    from .numerics import print_numerics, run_numerics

    nopts = argparse.Namespace(shape=opts.numerics_shape, device=opts.device, npt_layers=opts.numerics_layers,
                               num_layers=None, rank=64, num_ranks=1, dual=True, seq=opts.numerics_seq, batch=1,
                               seed=0, np_dir=None, step_repeats=opts.numerics_repeats)
    res = run_numerics(nopts)
    return {"status": "ok", **res, "lines": print_numerics(res).splitlines()}


def part_bnb(opts) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA", "lines": ["skipped: no CUDA"]}
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001
        return {"status": "skipped", "reason": f"bitsandbytes does not import ({type(exc).__name__})",
                "lines": [f"skipped: bitsandbytes does not import ({exc})"]}
    from npt_ds.config import LossConfig, ModelConfig, NPTConfig
    from npt_ds.model import convert_model, load_base_model, np_named_parameters
    from npt_ds.train.losses import NPTLoss
    from npt_ds.train.module import NPTTrainModule, StepControls

    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    rows = []
    for quant in ("none", "nf4", "int8"):
        torch.cuda.reset_peak_memory_stats()
        model = load_base_model(ModelConfig(path="tiny", quantization=quant, dtype="bfloat16"), seed=0)
        model = (model.cuda() if quant == "none" else model).train()  # bitsandbytes loads onto the GPU itself
        torch.manual_seed(1)
        convert_model(model, NPTConfig(layers="2,3", rank=8))
        module = NPTTrainModule(model, NPTLoss(LossConfig(), 2))
        loss, _ = module(ids, StepControls(diagnostics=False))
        loss.backward()
        grads = [p.grad for _, p in np_named_parameters(model)]
        rows.append({"quantization": quant, "loss": float(loss), "np_dtype": str(grads[0].dtype),
                     "grads_finite": all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
                     "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20})
        del model, module
    ref = rows[0]["loss"]
    for row in rows:
        row["loss_rel_to_bf16"] = row["loss"] / ref - 1
    ok = all(r["grads_finite"] and r["loss"] == r["loss"] for r in rows)
    cols = [("base", "quantization", ""), ("loss", "loss", ".5g"), ("vs bf16", "loss_rel_to_bf16", "+.2%"),
            ("grads finite", "grads_finite", ""), ("peak MiB", "peak_mem_mb", ".1f")]
    return {"status": "ok" if ok else "failed", "bitsandbytes": bitsandbytes.__version__, "rows": rows,
            "judged": "a finite loss and finite NP gradients (tiny model, 2 x 64 tokens); the loss next to the bf16 "
                      "base's is reported",
            "lines": format_table(rows, cols).splitlines()}


# ------------------------------------------------------------------------------------------------ targets
def targets(parts: dict, smoke: bool) -> dict:
    """The issue's targets, read from what the parts measured (reported, not judged, in the CPU smoke)."""
    def judged(threshold):
        return None if smoke else threshold

    speed = {r["run"]: r for r in parts.get("speed", {}).get("runs", [])}
    main = speed.get((SMOKE_RUNS if smoke else GPU_RUNS)[0].name, {})
    out = {}
    if main:
        out["mfu_8b_upper_resident"] = target(main.get("mfu"), judged(0.45), ">=", "perf/mfu, 8B upper half, ZeRO-3 "
                                              "resident, seq 4096")
        for key, what in (("step_over_planner", "step time"), ("mem_over_planner", "peak memory")):
            v = main.get(key)
            out[f"planner_{key.split('_')[0]}"] = target(None if v is None else abs(v - 1), judged(0.15), "<=",
                                                         f"measured / planned {what}, off 1 by, same run")
        ratios = parts["speed"].get("zero3_resident_over_zero2", {})
        first = next(iter(ratios.values()), None)
        out["zero3_resident_vs_zero2"] = target(first, judged(0.97), ">=", "ZeRO-3 resident / ZeRO-2 tokens/s, "
                                                + (next(iter(ratios), "-")))
        clock = parts["speed"].get("clock", {}).get("stream_over_host")
        out["stream_clock"] = target(None if clock is None else abs(clock - 1), judged(0.05), "<=",
                                     "CUDA-event own step time / (wall - collective time), off 1 by")
    step = parts.get("step", {}).get("targets", {}).get("fused_vs_two_pass_throughput")
    if step:
        out["fused_vs_two_pass"] = target(step["value"], judged(1.4), ">=", step["description"])
    tests = parts.get("tests", {})
    if "passed" in tests:
        out["gpu_tests"] = target(tests["failures"] + tests["errors"], 0, "<=", "failed `pytest -m cuda` tests")
    return out


def summary(data: dict) -> str:
    c = data["check"]
    lines = [f"# gpu-check {c['name']}", "", f"{c['started']} · `{c['cmd']}` · git {c.get('git_rev', '?')}"
             + (" · **CPU smoke: tiny shapes, no GPU numbers**" if c["cpu_smoke"] else ""), ""]
    for i, name in enumerate(PARTS, 1):
        part = data["parts"].get(name)
        if part is None:
            continue
        status = part.get("status")
        lines += [f"## {i}. {name}: {status}" + (f" ({part['wall_s']} s)" if "wall_s" in part else ""), ""]
        if part.get("error"):
            lines += ["```", part["error"][-1500:], "```", ""]
        if part.get("lines"):
            lines += ["```", *part["lines"], "```", ""]
    if data["targets"]:
        lines += ["## targets", "", "| target | value | want | |", "|---|---|---|---|"]
        for name, t in data["targets"].items():
            v = "-" if t["value"] is None else f"{t['value']:.3f}"
            want = "-" if t["threshold"] is None else f"{t['op']} {t['threshold']}"
            mark = "reported" if t["met"] is None else ("MET" if t["met"] else "MISSED")
            lines.append(f"| {name}: {t['description']} | {v} | {want} | {mark} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "gpu"), help="results directory")
    p.add_argument("--parts", default=",".join(PARTS), help="names or numbers, e.g. env,speed or 1,3")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU; CUDA parts are skipped")
    p.add_argument("--speed-runs", default="", help="part 3: only these runs (names as in the JSON)")
    p.add_argument("--speed-seq", type=int, default=None, help="part 3 sequence length (4096; smoke 32)")
    p.add_argument("--speed-steps", type=int, default=None, help="part 3 steps per run (8; smoke 3)")
    p.add_argument("--speed-warmup", type=int, default=None, help="part 3 warm-up steps left out (3; smoke 1)")
    p.add_argument("--step-repeats", type=int, default=None, help="part 4 timed rounds (3; smoke 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the smoke's runs (default 2)")
    return p


def resolve(opts: argparse.Namespace) -> argparse.Namespace:
    names = []
    for token in (t.strip() for t in opts.parts.split(",") if t.strip()):
        name = PARTS[int(token) - 1] if token.isdigit() and 1 <= int(token) <= len(PARTS) else token
        if name not in PARTS:
            raise UsageError(f"gpu-check --parts: unknown part {token!r}; choose from {', '.join(PARTS)} "
                             f"or 1-{len(PARTS)}")
        names.append(name)
    opts.part_names = names
    cuda = torch.cuda.is_available()
    if not cuda and not opts.cpu_smoke:
        raise UsageError("gpu-check: no CUDA device here; run the CPU smoke instead: make gpu-check CPU_SMOKE=1 "
                         "(python -m bench.gpu_check --cpu-smoke)")
    smoke = opts.cpu_smoke
    opts.device = "cuda" if cuda else "cpu"
    opts.precision = "bf16" if cuda else "auto"
    opts.gpu_mem_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 16.0
    from npt_ds.parallel.devices import peak_tflops

    opts.peak_tflops = peak_tflops(0.0)[0]
    opts.threads = opts.threads or (2 if smoke else 8)
    opts.speed_seq = opts.speed_seq or (32 if smoke else 4096)
    opts.speed_steps = opts.speed_steps or (3 if smoke else 8)
    opts.speed_warmup = opts.speed_warmup if opts.speed_warmup is not None else (1 if smoke else 3)
    opts.speed_timeout = 300 if smoke else 240
    opts.dist_seq = opts.speed_seq  # bench.dist.write_recipe's
    opts.tests_timeout = 150 if smoke else 240
    opts.step_shape, opts.step_layers = ("tiny", "2,3") if smoke else ("llama-3.1-8b", "16-31")
    opts.step_seq = 16 if smoke else 4096
    opts.step_repeats = opts.step_repeats or (1 if smoke else 3)
    opts.numerics_shape, opts.numerics_layers = ("tiny", "2,3") if smoke else ("llama-3.1-8b", "14-17")
    opts.numerics_seq, opts.numerics_repeats = (32, 1) if smoke else (1024, 3)
    return opts


class UsageError(Exception):
    """A bad flag or a machine the check cannot run on: one line, exit 2."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpu_smoke and torch.cuda.is_available():  # the CPU even where a GPU is: again, with no GPU visible
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.call([sys.executable, "-m", "bench.gpu_check", *argv], cwd=REPO_ROOT,
                               env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    try:
        opts = resolve(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc)
    device = "cpu-smoke" if opts.device == "cpu" else slug(torch.cuda.get_device_name(0))
    meta = {"name": f"{device}-{started:%Y-%m-%d}", "started": started.isoformat(timespec="seconds"),
            "cmd": "python -m bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpu_smoke": opts.device == "cpu", "parts_requested": opts.part_names,
            "git_rev": env_info("cpu").get("git_rev")}
    report = Report(Path(opts.out), meta["name"], meta)
    t_all = time.time()
    for name in opts.part_names:
        number = PARTS.index(name) + 1
        print(f"\n== part {number}: {name} ...", flush=True)
        t0 = time.time()
        try:
            fn = globals()[f"part_{name}"]
            res = fn(opts, report) if name == "speed" else fn(opts)
        except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others' measurements
            res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2500:]}"}
        res["wall_s"] = round(time.time() - t0, 1)
        if torch.cuda.is_available():  # the next part's models get the memory back
            gc.collect()
            torch.cuda.empty_cache()
        report.data["parts"][name] = res
        report.save()
        for line in res.get("lines", []) or [res.get("error", "")[-800:]]:
            print(f"   {line}")
        print(f"   -> {res['status']} ({res['wall_s']} s)", flush=True)
    report.data["check"]["wall_s"] = round(time.time() - t_all, 1)
    report.save()
    print(f"\n{report.json_path}\n{report.md_path}")
    for name, t in report.data["targets"].items():
        mark = "reported" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"target {name}: {t['value'] if t['value'] is None else round(t['value'], 4)} {mark}")
    failed = [n for n, p in report.data["parts"].items() if p.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
