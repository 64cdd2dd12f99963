"""Memory planner: DeepSpeed cross-check, does-not-fit advice, exact param counts, trends, CLI."""
from __future__ import annotations

import argparse
import json
import re

import pytest
import yaml

from npt_ds.config import NPTConfig, config_from_dict
from npt_ds.planning.cli import add_plan_subparser, run_plan
from npt_ds.planning.inputs import inputs_from_config
from npt_ds.planning.memory import GIB, PlanInputs, activation_bytes, make_plan, model_state_bytes, plan_memory
from npt_ds.planning.shape import load_shape, np_params_per_layer

NPT_RECIPE = {
    "model": {"path": "llama-3.1-8b", "quantization": "none"},
    "npt": {"layers": "14,15,16,17", "rank": 256, "num_ranks": 4},
    "data": {"seq_len": 2048, "micro_batch_size": 1},
    "deepspeed": {"precision": "bf16", "zero_stage": 3},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npt-ds")
    add_plan_subparser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str], capsys) -> tuple[int, str]:
    args = _parser().parse_args(["plan", *argv])
    assert args.func is run_plan
    rc = run_plan(args)
    return rc, capsys.readouterr().out


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "npt.yaml"
    path.write_text(yaml.safe_dump(NPT_RECIPE))
    return path


def _printed_gpu_gib(text: str, options: str) -> float:
    """GPU column of the estimator's table row whose options match ``options``."""
    for line in text.splitlines():
        if line.strip().endswith(options):
            return float(re.search(r"\|\s*([\d.]+)GB\s*\|", line).group(1))
    raise AssertionError(f"no row {options!r} in:\n{text}")


# --------------------------------------------------------------------------- (1) DeepSpeed cross-check
def test_llama8b_zero3_2x8_matches_deepspeed_estimator(capsys):
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)

    shape = load_shape("llama-3.1-8b")
    total, largest = shape.total_params(), shape.largest_module_params()
    assert total == 8_030_261_248 and largest == 128256 * 4096

    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=8, num_nodes=2)
    printed = _printed_gpu_gib(capsys.readouterr().out, "offload_param=none, offload_optimizer=none, zero_init=1")
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8, num_nodes=2,
                                                         cpu_offload=False, cpu_offload_params=False)
    assert printed == pytest.approx(ds_gpu / GIB, abs=0.01)

    ours = model_state_bytes(total, total, zero_stage=3, world_size=16, precision="bf16",
                             largest_layer_params=largest)
    assert ours.total == pytest.approx(ds_gpu, rel=0.05)
    print(f"ZeRO-3 2x8 all-trainable: planner {ours.total / GIB:.3f} GiB, DeepSpeed {ds_gpu / GIB:.3f} GiB")

    # NPT's real figure from the same function: only the NP params train, the bf16 base is frozen
    trainable = 4 * np_params_per_layer(4096, 14336, 256, 4)
    npt = model_state_bytes(total + trainable, trainable, zero_stage=3, world_size=16, precision="bf16",
                            frozen_bytes=2 * total, largest_layer_params=largest)
    assert npt.frozen_params == pytest.approx(2 * total / 16)
    assert npt.trainable_params + npt.gradients + npt.optimizer_state == pytest.approx(20 * trainable / 16)
    assert npt.total < 0.3 * ours.total


def test_llama8b_zero2_matches_deepspeed_estimator(capsys):
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)

    total = load_shape("llama-3.1-8b").total_params()
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=8, num_nodes=2)
    printed = _printed_gpu_gib(capsys.readouterr().out, "offload_optimizer=none")
    _, ds_gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
    assert printed == pytest.approx(ds_gpu / GIB, abs=0.01)
    ours = model_state_bytes(total, total, zero_stage=2, world_size=16, precision="bf16")
    assert ours.total == pytest.approx(ds_gpu, rel=0.05)
    print(f"ZeRO-2 2x8 all-trainable: planner {ours.total / GIB:.3f} GiB, DeepSpeed {ds_gpu / GIB:.3f} GiB")

    _, ds_offload = estimate_zero2_model_states_mem_needs(total, 8, 2, cpu_offload=True)
    offload = model_state_bytes(total, total, zero_stage=2, world_size=16, offload_optimizer=True)
    assert offload.total == pytest.approx(ds_offload, rel=0.05)


# --------------------------------------------------------------------------- (2) does not fit
def test_70b_zero0_on_one_gpu_does_not_fit(recipe, capsys):
    rc, out = _run([str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem", "80", "--zero-stage", "0",
                    "--override", "model.path=llama-3.1-70b"], capsys)
    assert rc == 1
    assert "DOES NOT FIT" in out
    lines = [line for line in out.splitlines() if line.startswith("does not fit:")]
    assert len(lines) == 1
    line = lines[0]
    assert re.match(r"does not fit: largest term is frozen base params \(\d+\.\d GiB\); try .+", line), line
    assert "nf4" in line  # one GPU: ZeRO cannot help, quantising the 131 GiB bf16 base does

    rc, out = _run([str(recipe), "--gpus-per-node", "1", "--zero-stage", "0", "--json",
                    "--override", "model.path=llama-3.1-70b"], capsys)
    data = json.loads(out)
    assert rc == 1 and data["fits"] is False and data["largest_term"] == "frozen_base_params"
    assert data["suggestion"].startswith("does not fit: largest term is frozen base params")


def test_does_not_fit_suggests_zero3_when_partitioning_helps():
    cfg = config_from_dict({**NPT_RECIPE, "model": {"path": "llama-3.1-70b"},
                            "deepspeed": {"precision": "bf16", "zero_stage": 1}})
    plan = make_plan(inputs_from_config(cfg, nodes=1, gpus_per_node=8, gpu_mem_gib=80))
    assert not plan.fits
    assert "try raise the ZeRO stage to 3" in plan.suggestion


# --------------------------------------------------------------------------- (3) exact param counts
@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False),
    dict(tie_word_embeddings=True),
    dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=24),
])
def test_param_counts_match_transformers_llama(tmp_path, overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deepspeed.runtime.zero.stage3 import model_to_params
    from npt_ds.model import convert_model, np_named_parameters

    hf = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    (tmp_path / "config.json").write_text(hf.to_json_string())

    for ref in (str(tmp_path), str(tmp_path / "config.json")):
        shape = load_shape(ref)
        assert shape.total_params() == sum(unique.values())
    assert (shape.total_params(), shape.largest_module_params()) == model_to_params(model)

    # NP params for a layer spec: the formula, written out here independently of the planner
    d, f, r, k = 64, 160, 8, 3
    spec = NPTConfig(layers="1-2", rank=r, num_ranks=k, dual=True, multiplicative=True)
    expected_per_layer = d * r + k * r * d + k * r * f + k * r * f + r * f
    convert_model(model, spec)
    np_real = sum(p.numel() for _, p in np_named_parameters(model))
    assert np_real == 2 * expected_per_layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == np_real

    cfg = config_from_dict({"model": {"path": str(tmp_path)},
                            "npt": {"layers": "1-2", "rank": r, "num_ranks": k, "dual": True,
                                    "multiplicative": True}})
    plan = plan_memory(inputs_from_config(cfg, nodes=1, gpus_per_node=1, gpu_mem_gib=80))
    assert plan.inputs.npt_layers == (1, 2)
    assert plan.params["np_per_layer"] == expected_per_layer
    assert plan.params["np_total"] == np_real
    assert plan.params["base_total"] == sum(unique.values())


def test_presets_and_quantisation():
    assert load_shape("llama-3.1-70b").total_params() == 70_553_706_496
    small = load_shape("smollm2")  # the default model.path maps to the shipped SmolLM2-135M shape
    assert small.total_params() == 134_515_008 and small.tie_word_embeddings
    assert load_shape("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    shape = load_shape("llama-3.1-8b")
    none, int8, nf4 = (shape.base_bytes(q, 2) for q in ("none", "int8", "nf4"))
    assert none == 2 * shape.total_params()
    assert nf4 < int8 < none
    assert 0.28 < nf4 / none < 0.40  # 0.5625 B for linears, 2 B for embed/lm_head


# --------------------------------------------------------------------------- (4) trends
def _inputs(**kw) -> PlanInputs:
    shape = load_shape("llama-3.1-8b")
    base = dict(shape=shape, npt_layers=(14, 15, 16, 17), rank=256, num_ranks=4, seq_len=2048,
                micro_batch_size=1, precision="bf16", zero_stage=3, nodes=2, gpus_per_node=8)
    return PlanInputs(**{**base, **kw})


@pytest.mark.parametrize("student_stream", [False, True])
def test_activation_checkpointing_lowers_activations(student_stream):
    off = plan_memory(_inputs(student_stream=student_stream))
    on = plan_memory(_inputs(student_stream=student_stream, activation_checkpointing=True))
    assert on.terms["activations"] < off.terms["activations"]
    assert on.activations_alt == pytest.approx(off.terms["activations"])
    # the student MLP of 3 of the 4 NPT layers is dropped (one is recomputed at a time): >= 3 * 3bf per token
    saved = off.terms["activations"] - on.terms["activations"]
    assert saved >= 3 * 3 * 2 * 14336 * 2048


def test_activations_scale_with_tokens_and_streams():
    shape = load_shape("llama-3.1-8b")
    kw = dict(rank=256, num_ranks=4, act_bytes=2)
    one = activation_bytes(shape, [14], seq_len=1024, micro_batch_size=1, **kw)["total"]
    two = activation_bytes(shape, [14], seq_len=1024, micro_batch_size=2, **kw)["total"]
    assert two == pytest.approx(2 * one)
    single = activation_bytes(shape, [14, 15], seq_len=1024, micro_batch_size=1, **kw)["total"]
    fused = activation_bytes(shape, [14, 15], seq_len=1024, micro_batch_size=1, student_stream=True, **kw)["total"]
    logits = activation_bytes(shape, [14, 15], seq_len=1024, micro_batch_size=1, student_stream=True,
                              want_logits=True, **kw)["total"]
    assert single < fused < logits


@pytest.mark.parametrize("vectors", ["none", "diagnostics", "keep"])
@pytest.mark.parametrize("student_stream", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_bounds_measured_autograd_tensors(student_stream, checkpointing, vectors, monkeypatch):
    """Bytes autograd saves (non-parameter storages) + LayerOutput tensors of a real fused step on a
    small Llama: the formula may over-estimate a little, never under-estimate."""
    import torch

    # a ZeRO-3 engine built earlier in this process leaves F.linear patched (DeepSpeed's
    # memory-efficient linear), which saves different tensors: measure plain torch
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)

    from npt_ds.model import NPExtras, convert_model, fused_forward, npt_layers, tiny_llama

    over = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512)
    model = tiny_llama(over)
    convert_model(model, NPTConfig(layers="2,3", rank=16, num_ranks=3))
    for layer in npt_layers(model):
        layer.checkpoint_student = checkpointing
    params = {p.data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    alive = []  # hold every saved tensor: a freed storage's address must not be reused and miscounted

    def pack(t):
        if t.data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            alive.append(t)
        return t

    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused_forward(model, ids, mixing_ratio=0.5 if student_stream else 0.0, student_stream=student_stream,
                            extras=NPExtras(vectors=vectors == "keep", reg=True, diagnostics=vectors == "diagnostics"))
    for lo in out.layers:
        assert (lo.v_a is not None) == (vectors == "keep") and (lo.stats is not None) == (vectors == "diagnostics")
        for t in (lo.student_out, lo.target, lo.attn, lo.x, lo.h_in, lo.coef, lo.v_a, lo.v_b):
            if t is None:
                continue
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    measured = sum(kept.values())

    from npt_ds.config import TINY_DEFAULTS
    from npt_ds.planning.shape import ModelShape

    shape = ModelShape.from_hf_config({**TINY_DEFAULTS, **over})
    est = activation_bytes(shape, [2, 3], seq_len=64, micro_batch_size=2, rank=16, num_ranks=3, act_bytes=4,
                           student_stream=student_stream, checkpointing=checkpointing, keep_vectors=vectors == "keep")
    # diagnostics reduce each layer's vectors to stats at once: nothing of them is kept
    want = est["npt_and_student_layers"] + (est["vectors"] if vectors == "keep" else 0.0)
    assert measured <= want <= 1.25 * measured


def test_zero3_per_gpu_params_shrink_with_more_gpus():
    per_gpu = [plan_memory(_inputs(nodes=n)).terms for n in (1, 2, 4)]
    for small, big in zip(per_gpu, per_gpu[1:]):
        for term in ("frozen_base_params", "np_params", "gradients", "optimizer_state"):
            assert big[term] < small[term]
        assert big["frozen_base_params"] == pytest.approx(small["frozen_base_params"] / 2)
    z2 = [plan_memory(_inputs(nodes=n, zero_stage=2)).terms for n in (1, 2)]
    assert z2[0]["frozen_base_params"] == z2[1]["frozen_base_params"]  # replicated below ZeRO-3
    assert z2[1]["optimizer_state"] < z2[0]["optimizer_state"]


# --------------------------------------------------------------------------- (5) CLI
def test_cli_fits_table_and_json(recipe, capsys):
    rc, out = _run([str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--gpu-mem", "80"], capsys)
    assert rc == 0
    for label in ("frozen base params", "NP params", "gradients", "optimizer state", "activations",
                  "temp buffers", "total", "GPU memory"):
        assert label in out
    assert "FITS" in out and "does not fit" not in out and "ZeRO-3" in out

    rc, out = _run([str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--json",
                    "--activation-checkpointing", "--override", "data.micro_batch_size=2"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["fits"] is True and data["suggestion"] is None
    assert data["inputs"]["world_size"] == 16 and data["inputs"]["micro_batch_size"] == 2
    assert data["inputs"]["activation_checkpointing"] is True
    assert data["activations"]["with_checkpointing"] < data["activations"]["without_checkpointing"]
    assert data["total_gib"] == pytest.approx(sum(t["gib"] for t in data["terms"].values()), abs=0.01)
    assert data["params"]["np_total"] == 4 * np_params_per_layer(4096, 14336, 256, 4)


def test_cli_zero_stage_from_deepspeed_json(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1e7}}))
    recipe = {**NPT_RECIPE, "deepspeed": {"precision": "bf16", "config": str(ds)}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rc, out = _run([str(path), "--gpus-per-node", "8", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["inputs"]["zero_stage"] == 2
    assert data["inputs"]["deepspeed"]["reduce_bucket_size"] == 10_000_000

    recipe["deepspeed"]["config"] = str(tmp_path / "missing.json")  # absent file: default to ZeRO-3
    path.write_text(yaml.safe_dump(recipe))
    rc, out = _run([str(path), "--gpus-per-node", "8", "--json"], capsys)
    assert json.loads(out)["inputs"]["zero_stage"] == 3
    rc, out = _run([str(path), "--gpus-per-node", "8", "--zero-stage", "1", "--json"], capsys)
    assert json.loads(out)["inputs"]["zero_stage"] == 1


def test_shipped_deepspeed_json_found_from_any_cwd(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    template = Path(__file__).resolve().parents[2] / "ds_configs" / "zero2_bf16.json"
    if not template.is_file():
        pytest.skip("ds_configs/zero2_bf16.json not in this checkout")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**NPT_RECIPE, "deepspeed": {"precision": "bf16",
                                                                "config": "ds_configs/zero2_bf16.json"}}))
    monkeypatch.chdir(tmp_path)  # resolved under the repository root, as npt_ds.parallel.ds_config does
    rc, out = _run([str(path), "--gpus-per-node", "8", "--json"], capsys)
    data = json.loads(out)
    assert data["inputs"]["zero_stage"] == 2 and data["inputs"]["deepspeed"]["source"].endswith("zero2_bf16.json")


def test_cli_bad_config_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**NPT_RECIPE, "model": {"path": "no-such-model"}}))
    rc, out = _run([str(path)], capsys)
    assert rc == 2 and "no-such-model" in out and "llama-3.1-8b" in out


# --------------------------------------------------------------------------- frozen-base modes and step time
def _plan_cli(capsys, *argv):
    from npt_ds.cli import main

    rc = main(["plan", *argv])
    return rc, capsys.readouterr().out


def test_plan_predicts_step_time_per_frozen_base_mode_and_recommends_resident_for_8b(capsys):
    rc, out = _plan_cli(capsys, "configs/llama3_8b_multinode.yaml", "--nodes", "2", "--gpus-per-node", "8",
                        "--gpu-mem", "80", "--json")
    data = json.loads(out)
    rows = {r["mode"]: r for r in data["frozen_base_modes"]}
    assert set(rows) == {"partitioned", "resident", "hpz", "quantized"} and all(r["fits"] for r in rows.values())
    assert data["recommended_frozen_base"]["mode"] == "resident"
    # grad_accum 4: partitioned gathers the bf16 base + NP params on each of the 4 forwards, resident only the NP
    # params after the step; hpz keeps the big gathers inside the node
    r, p, h = rows["resident"], rows["partitioned"], rows["hpz"]
    assert p["gathered"] == pytest.approx(4 * (p["frozen"] + p["trainable"]))
    assert r["gathered"] == pytest.approx(r["trainable"]) and r["reduced"] == pytest.approx(4 * r["trainable"])
    # hpz: only the trainable params' gradient reduce crosses nodes, as with resident
    assert h["inter"] == pytest.approx(r["inter"]) and h["inter"] < 0.05 * p["inter"]
    assert r["step_s"] < h["step_s"] < p["step_s"]
    assert r["mem_gib"] > p["mem_gib"]  # the price: the whole base on every GPU
    rc, text = _plan_cli(capsys, "configs/llama3_8b_multinode.yaml", "--nodes", "2", "--gpus-per-node", "8")
    assert "recommended: deepspeed.frozen_base: resident" in text and "tok/s/GPU" in text


def test_plan_recommends_hpz_or_quantized_when_resident_does_not_fit(capsys):
    rc, out = _plan_cli(capsys, "configs/llama3_8b_multinode.yaml", "--nodes", "2", "--gpus-per-node", "8",
                        "--gpu-mem", "80", "--override", "model.path=llama-3.1-70b", "--json")
    data = json.loads(out)
    rows = {r["mode"]: r for r in data["frozen_base_modes"]}
    assert not rows["resident"]["fits"] and rows["hpz"]["fits"]
    rec = data["recommended_frozen_base"]
    assert rec["mode"] in ("hpz", "quantized") and "resident needs" in rec["why"]


def test_link_bandwidth_flag_is_checked(capsys):
    rc, out = _plan_cli(capsys, "configs/llama3_8b_multinode.yaml", "--link-gbps", "fast")
    assert rc == 2 and "--link-gbps" in out


def test_step_flops_match_flop_counter_on_the_tiny_model():
    """The analytic NPT step FLOPs against torch.utils.flop_counter on a real fused step (tiny Llama)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from npt_ds.train.losses import NPTLoss
    from npt_ds.config import LossConfig
    from npt_ds.model import convert_model, tiny_llama
    from npt_ds.planning.step_cost import step_flops
    from npt_ds.train.module import NPTTrainModule, StepControls

    model = tiny_llama()
    convert_model(model, NPTConfig(layers="1,2", rank=8))
    module = NPTTrainModule(model, NPTLoss(LossConfig(reg_lambda=0.0), 2))
    ids = torch.randint(0, 256, (2, 64))
    with FlopCounterMode(display=False) as counter:
        loss, _ = module(ids, StepControls(diagnostics=False))
        loss.backward()
    shape = load_shape("tiny")
    inputs = PlanInputs(shape=shape, npt_layers=(1, 2), rank=8, seq_len=64, micro_batch_size=2)
    # the CPU SDPA kernel has no flop-counter formula: compare without the attention core
    assert step_flops(inputs, attention_core=False) == pytest.approx(counter.get_total_flops(), rel=0.05)
