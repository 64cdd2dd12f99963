"""bench/: the two-pass reference equals the fused step; the benchmark entry points produce their results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a top-level package next to npt_ds/, not installed
    sys.path.insert(0, str(ROOT))

from bench.dist import parse_metrics, scan_trace_warnings  # noqa: E402
from bench.micro import naive_modulated_mlp, vector_modulated_mlp  # noqa: E402
from bench.run import build_parser, resolve, run_section  # noqa: E402
from bench.step import StepBench, run_step  # noqa: E402
from bench.two_pass import capture_teacher, two_pass_forward, two_pass_reuse_forward  # noqa: E402
from npt_ds.config import LossConfig, NPTConfig  # noqa: E402
from npt_ds.train.losses import NPTLoss  # noqa: E402
from npt_ds.model import (Modulation, NPComponent, convert_model, np_named_parameters, modulated_mlp,  # noqa: E402
                          set_mode, tiny_llama)
from npt_ds.train.module import NPTTrainModule, StepControls  # noqa: E402


def _converted(layers="2,3", **npt):
    model = tiny_llama()
    torch.manual_seed(1)
    convert_model(model, NPTConfig(layers=layers, rank=8, **npt))
    for _, p in np_named_parameters(model):  # move off the near-zero init so gradients are non-trivial
        p.data.normal_(std=0.05)
    return model


def _loss_and_grads(model, fn):
    params = [p for _, p in np_named_parameters(model)]
    for p in params:
        p.grad = None
    loss = fn()
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("npt", [{}, {"num_ranks": 2, "dual": True, "multiplicative": True}])
def test_two_pass_reference_matches_fused_step(npt):
    model = _converted(**npt)
    loss_fn = NPTLoss(LossConfig(), 2)
    module = NPTTrainModule(model, loss_fn)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, lambda: module(ids, StepControls())[0])
    for forward in (two_pass_reuse_forward, two_pass_forward):
        loss, grads = _loss_and_grads(model, lambda f=forward: loss_fn(f(model, ids))[0])
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7), (forward.__name__, loss, ref_loss)
        for g, r in zip(grads, ref_grads):
            assert r.abs().max() > 0
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max())), forward.__name__


def test_teacher_capture_targets_are_layer_residual_updates():
    model = _converted()
    ids = torch.randint(0, 256, (1, 16))
    captured, attn_kwargs = capture_teacher(model, ids)
    assert sorted(captured) == [2, 3] and "position_embeddings" in attn_kwargs
    assert all(layer.mode == "student" for layer in model.model.layers[2:])  # mode restored
    set_mode(model, "teacher")
    with torch.no_grad():
        hidden = model.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    set_mode(model, "student")
    assert torch.equal(captured[2][0], hidden[2]) and torch.equal(captured[2][1], hidden[3])
    assert torch.equal(captured[2][1], captured[3][0])


@pytest.mark.parametrize("k,dual,mult", [(1, False, False), (4, False, False), (1, True, True), (3, True, False)])
def test_vector_and_naive_mlps_match_modulated_mlp(k, dual, mult):
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    torch.manual_seed(k)
    d, f, T = 12, 20, 5
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act="silu", num_attention_heads=2,
                               num_key_value_heads=2)).double()
    comp = NPComponent(d, f, rank=4, num_ranks=k, dual=dual, multiplicative=mult, init_std_b=0.3,
                       init_std_a=0.3, init_std_down=0.3).double()
    if comp.W_m is not None:
        nn.init.normal_(comp.W_m, std=0.5)
    x, attn = torch.randn(2, T, d, dtype=torch.float64), torch.randn(2, T, d, dtype=torch.float64)
    mod = Modulation(*comp(attn))
    want = modulated_mlp(mlp, x, comp, attn, 0.1)[0]
    assert torch.allclose(vector_modulated_mlp(mlp, x, mod, 0.1), want, atol=1e-12)
    if not (dual or mult):
        assert torch.allclose(naive_modulated_mlp(mlp, x, mod, 0.1), want, atol=1e-12)


def _opts(*args):
    return resolve(build_parser().parse_args(list(args)))


@pytest.fixture
def keep_threads(monkeypatch):
    """run_section pins torch/OMP threads; restore them for the rest of the session."""
    import os

    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_micro_quick_produces_results(tmp_path, keep_threads):
    opts = _opts("--only", "micro", "--quick", "--repeats", "2", "--ks", "1,4", "--micro-tokens", "32",
                 "--naive-tokens", "2", "--inner", "1", "--threads", "1", "--out", str(tmp_path))
    res = run_section("micro", opts)
    assert {"config", "rows", "ratios", "targets", "env", "name", "wall_s"} <= set(res)
    variants = {r["variant"] for r in res["rows"]}
    assert {"plain", "npt_k1", "npt_k4", "npt_frozen_in_k1", "npt_vectors_k1", "naive_k1", "npt_k1@2"} <= variants
    for row in res["rows"]:
        assert row["tokens_per_s"] > 0 and row["ms_median"] > 0 and row["alloc_peak_mb"] >= 0 and row["gflop"] > 0
    assert {"npt_k1/plain", "npt_k4/plain", "naive_k1/npt_k1@2"} <= set(res["ratios"])
    assert set(res["ratios"]["npt_k1/plain"]) == {"of_medians", "paired_median", "of_minima"}
    assert res["ratios"]["naive_k1_max_abs_err_vs_fused"] < 1e-4
    assert set(res["targets"]) == {"modulated_mlp_k1_vs_plain", "naive_vs_fused_k1"}
    assert res["targets"]["modulated_mlp_k1_vs_plain"]["value"] > 0
    # the CLI path writes the same dict as JSON
    from bench.common import write_results

    path = write_results(res["name"], res, opts.out)
    assert path.name == "micro-quick.json" and json.loads(path.read_text())["targets"]


def test_step_bench_on_tiny_model():
    opts = _opts("--only", "step", "--shape", "tiny", "--seq", "16", "--repeats", "2", "--no-rss-probe",
                 "--npt-layers", "1,2")  # a layer above the NPT ones: what the multi-layer stages may skip
    res = run_step(opts)
    assert [r["variant"] for r in res["rows"]] == ["fused", "two_pass", "two_pass_reuse", "plain", "teacher_fwd",
                                                   "mixed", "mixed_to_end", "teacher_stage_to_end", "kd_fidelity",
                                                   "kd_fidelity_adaptive"]
    # the multi-layer stages do less than they used to (no layer that no loss reads); adaptive costs extra passes
    assert res["ratios"]["mixed/mixed_to_end"]["flops"] < 1.0
    assert res["ratios"]["fused/teacher_stage_to_end"]["flops"] < 1.0
    assert res["ratios"]["kd_fidelity_adaptive/kd_fidelity"]["flops"] > 1.2
    assert res["breakdown_s"]["teacher_forward"] > 0
    for name, eq in res["equivalence"].items():
        assert eq["rel_diff"] < 1e-5 and eq["grad_max_rel_diff"] < 1e-3, name
    assert {"fused/two_pass", "fused/two_pass_reuse", "fused/plain"} <= set(res["ratios"])
    for ref in ("two_pass", "two_pass_reuse"):  # the fused step does strictly less work than either
        assert res["ratios"][f"fused/{ref}"]["flops"] < 1.0, ref
    assert res["ratios"]["fused/two_pass"]["flops"] < res["ratios"]["fused/two_pass_reuse"]["flops"]
    assert set(res["targets"]) == {"fused_vs_two_pass_throughput", "fused_vs_plain_cost"}
    bench = StepBench(opts)
    before = [p.detach().clone() for p in bench.params]
    bench.steps["fused"]()
    assert any(not torch.equal(a, p) for a, p in zip(before, bench.params))  # Adam really stepped


def test_dist_log_and_metrics_parsing(tmp_path):
    log = ("eval @ step 0: ppl\n\rstep      1/3 [#] loss 1 10 tok/s ETA x\r"
           "step      2/3 [#] loss 1 12 tok/s ETA x\nInvalidate trace cache @ step 7: expected module 3, but got 4\n"
           "\rstep      3/3 [#] loss 1 12 tok/s ETA x\n"
           "Invalidate trace cache @ step 531 and module 3: cache has only\n")
    scan = scan_trace_warnings(log)
    assert scan == {"invalidations": 2, "by_train_step": {3: 1, 4: 1}}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"event": "start", "step": 0},
        *({"event": "train", "step": s, "tokens_per_s": 100.0 * s, "loss/total": 1.0 / s} for s in (1, 2, 3, 4)),
    ]))
    m = parse_metrics(metrics, warmup=2)
    assert m["steady_steps"] == 2 and m["tokens_per_s_median"] == 350.0 and m["loss_first"] == 1.0


def test_cli_rejects_unknown_section_and_big_shape_on_cpu():
    with pytest.raises(SystemExit):
        _opts("--only", "micro,bogus")
    from bench.models import build_model

    opts = _opts("--only", "step", "--shape", "llama-3.1-8b")
    with pytest.raises(SystemExit, match="num-layers"):
        build_model(opts)


def test_no_mask_sync_patch_keeps_the_fused_loss():
    """The recommended fused.py change (create_causal_mask without position_ids) changes no number."""
    import npt_ds.model.fused as fused_mod
    from bench.dist_worker import patch_no_mask_sync

    model = _converted()
    module = NPTTrainModule(model, NPTLoss(LossConfig(), 2))
    ids = torch.randint(0, 256, (2, 24))
    want = module(ids, StepControls())[0]
    saved = fused_mod.create_causal_mask
    try:
        patch_no_mask_sync()
        got = module(ids, StepControls())[0]
    finally:
        fused_mod.create_causal_mask = saved
    assert torch.equal(got, want)


def test_gloo_bandwidth_probe_measures_an_all_gather():
    proc = subprocess.run([sys.executable, "-m", "bench.gloo_probe", "4", "2"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["message_gb_per_s"] > 0 and result["message_mb"] == 4.0


def test_monitor_bench_loads_a_git_revisions_monitor_side_by_side(tmp_path):
    """`monitor_bench.py --baseline REV --load-only`: REV's npt_monitor (git archive) and the current one
    each load the same file in fresh interpreters, alternating; both read every record. (No timing asserted:
    speed targets are `make bench`'s.)"""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "monitor_bench.py"), "--lines", "300",
                           "--load-repeats", "2", "--baseline", "HEAD", "--load-only", "--out", str(tmp_path / "r.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert result["baseline_rev"] == head and result["model_records"] == 301
    assert len(result["model_load_runs_s"]) == len(result["baseline_model_load_runs_s"]) == 2
    modules = result["load_modules"]
    assert modules["current"] == str(ROOT / "npt_monitor" / "__init__.py")
    assert modules["baseline"].endswith("/npt_monitor/__init__.py") and not modules["baseline"].startswith(str(ROOT))
    assert result["load_ratio"] > 0 and "app" not in result and "cost" not in result
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "monitor_bench.py"), "--lines", "10", "--load-only",
                          "--baseline", "no-such-rev"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("monitor_bench: --baseline no-such-rev: not a commit")


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_bench_section_leaves_dev_shm_as_it_found_it(tmp_path, monkeypatch, free_port):
    """The dist section's 2-rank sync probe starts DeepSpeed's CPU comm, whose shm all-reduce buffers (69 MB per
    rank) once outlived it; every rank now releases its own."""
    import bench.dist as dist_bench
    from bench.dist import run_sync_probe

    def ours(path):
        return path.name.startswith("deepspeed_allreduce_buffer_") and path.name.split("_")[-2] == str(free_port)

    monkeypatch.setattr(dist_bench, "free_port", lambda: free_port)  # the launch's MASTER_PORT names the buffers
    opts = _opts("--only", "dist")
    opts.dist_timeout = 300
    res = run_sync_probe(opts, tmp_path)
    assert "error" not in res, res.get("error")
    if not res["shm_buffer_before_release"]:  # the test can tell a release from a leak only where a buffer was made
        pytest.skip("DeepSpeed's shm_comm op did not load here: no buffer was made")
    assert res["syncs_per_step"] >= 0 and res["world_size"] == 2
    left = [p.name for p in Path("/dev/shm").iterdir() if ours(p)]
    assert not left, left
