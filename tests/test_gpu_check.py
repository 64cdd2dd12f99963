"""bench/gpu_check.py (`make gpu-check`): the CPU smoke runs every part and writes its JSON and summary; the
offline wheel set's resolution helpers; the random-weight shape model the GPU runs train."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a top-level package next to npt_ds/, not installed
    sys.path.insert(0, str(ROOT))

from bench.gpu_check import junit_counts  # noqa: E402
from bench.gpu_wheels import norm, pins, torch_closure  # noqa: E402
from bench.models import random_model, shape_config  # noqa: E402
from npt_ds.planning.shape import load_shape  # noqa: E402


def check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), *args], cwd=ROOT,
                          text=True, capture_output=True, timeout=600)


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_the_json(tmp_path):
    proc = check(tmp_path, "--cpu-smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("skipped: no CUDA") >= 3  # the GPU tests, the stream clock, bitsandbytes
    [path] = tmp_path.glob("cpu-smoke-*.json")
    data = json.loads(path.read_text())
    parts = data["parts"]
    assert list(parts) == ["env", "tests", "speed", "step", "numerics", "bnb"]
    assert parts["env"]["status"] == "ok" and parts["env"]["versions"]["deepspeed"]
    assert parts["tests"]["status"] == "skipped" and parts["tests"]["collected"] >= 9  # tests/**/test_cuda_*.py
    speed = parts["speed"]
    assert speed["status"] == "ok" and [r["run"] for r in speed["runs"]] == ["tiny-2,3-z3-resident", "tiny-2,3-z2"]
    for run in speed["runs"]:
        assert run["rc"] == 0 and run["steady_lines"] >= 1 and run["tokens_per_s"] > 0
        assert run["planner"]["mem_bytes"] > 0 and run["clock_host_own_s"] > 0 and run["clock_stream_own_s"] is None
    assert speed["clock"]["skipped"] == "no CUDA" and "tiny 2,3" in speed["zero3_resident_over_zero2"]
    step = parts["step"]
    assert step["status"] == "ok" and step["equivalence"]["two_pass"]["rel_diff"] < 1e-5
    assert {"fused/two_pass", "fused/plain"} <= set(step["ratios"])
    numerics = parts["numerics"]
    assert numerics["status"] == "ok" and numerics["mean"]["out_rel_err_fp32"] < 0.05
    assert numerics["mean"]["gate_unchanged"] > 0.5  # the tiny model's init update is far below a bf16 step
    assert parts["bnb"] == {"status": "skipped", "reason": "no CUDA", "lines": ["skipped: no CUDA"],
                            "wall_s": parts["bnb"]["wall_s"]}
    assert data["targets"]["fused_vs_two_pass"]["met"] is None  # the CPU smoke reports, it does not judge
    summary = path.with_suffix(".md").read_text()
    assert "## 3. speed: ok" in summary and "## targets" in summary and "CPU smoke" in summary


@pytest.mark.slow
def test_parts_subset_and_bad_flags(tmp_path):
    proc = check(tmp_path, "--cpu-smoke", "--parts", "1,bnb")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = check(tmp_path, "--cpu-smoke", "--parts", "env")  # the same day again: a new file, none overwritten
    assert first.returncode == 0
    [subset] = [p for p in tmp_path.glob("*.json") if not p.stem.endswith("-2")]
    assert (tmp_path / f"{subset.stem}-2.json").is_file()
    assert list(json.loads(subset.read_text())["parts"]) == ["env", "bnb"]
    bad = check(tmp_path, "--cpu-smoke", "--parts", "env,speedd")
    assert bad.returncode == 2 and "unknown part 'speedd'" in bad.stderr
    if not torch.cuda.is_available():
        refused = check(tmp_path)
        assert refused.returncode == 2 and "CPU_SMOKE=1" in refused.stderr


def test_wheel_pins_follow_pyproject_and_torch_brings_its_own(tmp_path):
    want = pins(ROOT / "pyproject.toml", ("deepspeed", "transformers", "numpy", "pytest", "bitsandbytes"))
    assert want["deepspeed"] == "deepspeed==0.19.8" and want["transformers"].startswith("transformers==")
    assert want["numpy"] == "numpy" and want["pytest"] == "pytest<9"
    items = [{"name": "torch", "requires": ["nvidia-nccl-cu12", "filelock", "sympy"]},
             {"name": "sympy", "requires": ["mpmath"]}, {"name": "mpmath", "requires": []},
             {"name": "nvidia-nccl-cu12", "requires": []}, {"name": "filelock", "requires": []},
             {"name": "transformers", "requires": ["filelock", "tokenizers"]}, {"name": "tokenizers", "requires": []}]
    assert torch_closure(items) == {"torch", "nvidia-nccl-cu12", "filelock", "sympy", "mpmath"}
    assert norm("PyYAML") == "pyyaml" and norm("typing_extensions") == "typing-extensions"


def test_shape_presets_build_with_random_weights_on_a_device():
    """What the GPU runs train (bench/dist_worker.py's shape_model patch): the preset's config, every parameter
    made on the given device, as many as the planner counts."""
    model = random_model(shape_config("llama-3.1-8b"), torch.bfloat16, "meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    assert sum(p.numel() for p in params) == load_shape("llama-3.1-8b").total_params()


def test_gpu_test_results_are_read_from_pytests_junit_xml(tmp_path):
    """Part 2's reading of `pytest -m cuda`: counts and each failure's name and message, from a real pytest run."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_bad():\n    assert 1 == 2, 'bf16 loss off by 3 %'\n"
        "def test_skip():\n    pytest.skip('no CUDA')\n")
    xml = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True, timeout=120)
    counts, failed = junit_counts(xml)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert [f["test"].split("::")[-1] for f in failed] == ["test_bad"] and "bf16 loss off by 3 %" in failed[0]["message"]
    assert junit_counts(tmp_path / "missing.xml") == ({"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, [])
