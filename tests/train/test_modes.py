"""Training modes: multi-layer teacher scaffolding, sequential layer-by-layer, cross-width KD."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from npt_ds.config import ConfigError, NPTConfig, load_config
from npt_ds.model import convert_model, fused_forward, npt_layers, set_mode, tiny_llama


def attn_kwargs(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    emb = model.model.embed_tokens(ids)
    return emb, dict(attention_mask=None, position_ids=pos, position_embeddings=model.model.rotary_emb(emb, position_ids=pos))


def manual_streams(model, ids, ratio):
    """Teacher and student streams layer by layer, written out independently of fused_forward."""
    layers = model.model.layers
    h, kw = attn_kwargs(model, ids)
    h_t, h_s, inputs = h, h, {}
    for i, layer in enumerate(layers):
        if hasattr(layer, "np"):
            h_in = (1 - ratio) * h_t + ratio * h_s
            inputs[i] = h_in
            y = layer.student_step(h_in, kw) - h_in
            h_t, h_s = layer.teacher_step(h_t, kw), h_s + y
        else:
            h_t, h_s = layer(h_t, **kw), layer(h_s, **kw)
    return h_t, h_s, inputs


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_mixing_ratio_sets_the_student_input_and_outputs_propagate(ratio):
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="1,3", rank=4, init_std_b=0.05))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        out = fused_forward(model, ids, mixing_ratio=ratio, student_stream=True)
        h_t, h_s, inputs = manual_streams(model, ids, ratio)
        ref_hidden = tiny_llama()(input_ids=ids, output_hidden_states=True).hidden_states
        set_mode(model, "student")
        student_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    layer3 = out.layers[1]
    assert layer3.index == 3
    assert torch.allclose(layer3.h_in, inputs[3], atol=1e-6)
    if ratio == 0.0:
        assert torch.allclose(layer3.h_in, ref_hidden[3], atol=1e-6)  # the teacher state
    if ratio == 1.0:
        assert torch.allclose(layer3.h_in, student_hidden[3], atol=1e-6)  # the student state
    # the NPT outputs always propagate: the student stream is not the teacher stream, in every stage
    assert torch.allclose(out.student_hidden, model.model.norm(h_s), atol=1e-6)
    assert torch.allclose(out.teacher_hidden, model.model.norm(h_t), atol=1e-6)
    assert (out.student_hidden - out.teacher_hidden).abs().max() > 1e-4


def test_held_out_layer_metrics_use_fixed_protocols():
    """eval/layer/{i}/direct_mse_{teacher,student}_in against hand-written streams at ρ = 0 and ρ = 1."""
    from npt_ds.train.evaluate import evaluate, layer_table, success_bars, success_line
    from npt_ds.model.diagnostics import attn_alignment

    torch.manual_seed(0)
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="1,3", rank=4, init_std_b=0.05))
    batches = [torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    res = evaluate(model, batches)
    want: dict[str, float] = {}
    with torch.no_grad():
        for ids in batches:
            h, kw = attn_kwargs(model, ids)
            h_t = h
            for i, layer in enumerate(model.model.layers):  # the teacher stream and each layer's target
                if i in (1, 3):
                    target = layer.teacher_step(h_t, kw) - h_t
                    for proto, ratio in (("teacher_in", 0.0), ("student_in", 1.0)):
                        h_in = manual_streams(model, ids, ratio)[2][i]
                        y = layer.student_step(h_in, kw) - h_in
                        key = f"eval/layer/{i}/direct_mse_{proto}"
                        want[key] = want.get(key, 0.0) + (y - target).pow(2).mean().item() / len(batches)
                    attn = layer.attention(h_t, **kw)
                    key = f"eval/layer/{i}/v_a_attn_sim"
                    want[key] = want.get(key, 0.0) + attn_alignment(layer.np(attn)[0], attn).item() / len(batches)
                h_t = layer.teacher_step(h_t, kw) if i in (1, 3) else layer(h_t, **kw)
    assert set(want) == {k for k in res if k.startswith("eval/layer/")}
    for key, value in want.items():
        assert res[key] == pytest.approx(value, rel=1e-5), key
    # the first NPT layer reads the same input in both protocols; the second sees upstream NPT error
    assert res["eval/layer/1/direct_mse_teacher_in"] == pytest.approx(res["eval/layer/1/direct_mse_student_in"])
    assert res["eval/layer/3/direct_mse_student_in"] != pytest.approx(res["eval/layer/3/direct_mse_teacher_in"])
    table = layer_table(res, res)
    assert len(table) == 3 and table[1].split()[0] == "1"
    # the success bars: the layers' mean similarity and the final state's MSE, each against its bar
    bars = success_bars(res)
    sim = (want["eval/layer/1/v_a_attn_sim"] + want["eval/layer/3/v_a_attn_sim"]) / 2
    assert bars["v_a_attn_sim"] == pytest.approx(sim, rel=1e-5) and bars["v_a_attn_sim_met"] == (sim > 0.7)
    assert bars["fidelity_mse"] == res["eval/fidelity_mse"] and bars["fidelity_mse_met"] == (res["eval/fidelity_mse"] < 0.1)
    assert bars["ppl_ratio"] == res["eval/ppl_npt"] / res["eval/ppl_base"]
    line = success_line({**res, "eval/fidelity_mse": 0.05})
    assert f"{res['eval/ppl_npt'] / res['eval/ppl_base']:.4f}" in line and "fidelity MSE 0.05 (< 0.1: met)" in line


def test_sequential_forward_carries_earlier_layers():
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="1,2", rank=4, init_std_b=0.1, init_std_a=0.2))
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        out = fused_forward(model, ids, mixing_ratio=1.0, active={2})
        assert [lo.index for lo in out.layers] == [2]
        h, kw = attn_kwargs(model, ids)
        h = model.model.layers[0](h, **kw)
        carried = npt_layers(model)[0].student_step(h, kw)
        assert torch.allclose(out.layers[0].h_in, carried, atol=1e-6)  # layer 1's NPT output is used
        assert not torch.allclose(carried, npt_layers(model)[0].teacher_step(h, kw), atol=1e-4)
        first = fused_forward(model, ids, mixing_ratio=1.0, active={1})
        assert [lo.index for lo in first.layers] == [1]  # layer 2 is not trained yet: teacher behaviour


def tiny_run(tmp_path, *overrides):
    from npt_ds.train.trainer import Trainer

    cfg = load_config("configs/tiny_debug.yaml", [f"logging.run_dir={tmp_path}", "logging.console=false",
                                                  "checkpoint.resume=none", *overrides])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in rows if r.get("event") == "train"]


@pytest.mark.slow
def test_multi_layer_run_follows_the_curriculum(tmp_path):
    _, rows = tiny_run(tmp_path, "schedule.mode=multi_layer", "npt.layers=1-3", "schedule.total_steps=9",
                       "loss.fidelity_weight=0.5", "checkpoint.every=0", "checkpoint.save_final=false")
    stages = [(r["step"], r["curriculum/stage"], r["curriculum/mixing_ratio"]) for r in rows]
    # default curriculum for multi_layer: thirds of teacher, mixed 0.5, student (logged after the step)
    assert stages[0] == (1, "teacher", 0.0) and stages[3] == (4, "mixed", 0.5) and stages[-1] == (9, "student", 1.0)
    assert all(f"layer/{i}/direct_mse" in rows[-1] and f"layer/{i}/v_a_attn_sim" in rows[-1] for i in (1, 2, 3))
    assert rows[-1]["loss/fidelity"] > 0


def checkpoint_np(step_dir):
    """A checkpoint's NP weights (one file per NPT layer), merged."""
    return {k: v for f in sorted((step_dir / "np").glob("np_weights*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.slow
def test_sequential_keeps_trained_layers(tmp_path):
    trainer, rows = tiny_run(tmp_path, "schedule.mode=sequential", "schedule.total_steps=8", "checkpoint.every=4",
                             "schedule.curriculum=student:8")
    assert [r["sequential/layer"] for r in rows] == [2, 2, 2, 2, 3, 3, 3, 3]
    assert list(rows[0]) and all("layer/3/direct_mse" not in r for r in rows[:4])
    w4 = checkpoint_np(tmp_path / "checkpoints" / "step-00000004")
    w8 = checkpoint_np(tmp_path / "checkpoints" / "step-00000008")
    init = tiny_llama()
    convert_model(init, NPTConfig(layers="2,3", rank=8))
    for name in ("W_down", "W_a_up", "W_b_up"):
        key2, key3 = f"model.layers.2.np.{name}", f"model.layers.3.np.{name}"
        assert torch.equal(w4[key2], w8[key2])  # layer 2 is carried unchanged while layer 3 trains
        assert not torch.equal(w4[key3], w8[key3])
    # layer 3 did not move while layer 2 trained: its step-4 weights are still the initial ones
    torch.manual_seed(0)
    fresh = tiny_llama()
    convert_model(fresh, NPTConfig(layers="2,3", rank=8))
    assert all(w4[f"model.layers.3.np.{n}"].shape == dict(fresh.named_parameters())[f"model.layers.3.np.{n}"].shape
               for n in ("W_down", "W_a_up", "W_b_up"))
    assert torch.equal(w4["model.layers.3.np.W_down"], dict(fresh.named_parameters())["model.layers.3.np.W_down"])


CROSS_WIDTH = ("model.teacher_path=tiny", "model.teacher_tiny={hidden_size: 96, intermediate_size: 224}",
               "loss.kd_weight=0.7", "loss.kd_temperature=1.0", "checkpoint.every=0", "checkpoint.save_final=false")


@pytest.mark.slow
def test_cross_width_kd(tmp_path):
    trainer, rows = tiny_run(tmp_path, *CROSS_WIDTH, "schedule.total_steps=40", "optim.lr=0.001")
    kl = [r["kd/kl"] for r in rows]
    assert kl[0] < 8.0, kl[0]  # the spec initialisation of the projector: nowhere near "random"
    ce = [r["loss/projector_ce"] for r in rows]  # the projector learns its own objective
    assert sum(ce[-8:]) < 0.9 * sum(ce[:8]), ce
    weights = [r["kd/weight"] for r in rows]
    assert weights[0] == pytest.approx(0.1) and weights[-1] == pytest.approx(0.7)
    groups = {g["name"]: g for g in trainer.engine.optimizer.param_groups}
    proj = next(g for n, g in groups.items() if "logit_projector" in n)
    np_group = next(g for n, g in groups.items() if ".np." in n)
    assert proj["lr"] == pytest.approx(5 * np_group["lr"])


@pytest.mark.slow
def test_cross_width_kl_falls_because_the_student_moves(tmp_path):
    """With the projector (hence the teacher) held fixed, KL can only fall by the student moving towards it."""
    _, rows = tiny_run(tmp_path, *CROSS_WIDTH, "schedule.total_steps=60", "optim.lr=0.01", "loss.direct_weight=0",
                       "loss.kd_warmup_frac=0",
                       "optim.param_groups=[{pattern: '*logit_projector*', lr_mult: 0.0}, {pattern: '*.np.*'}]")
    kl = [r["kd/kl"] for r in rows]
    assert sum(kl[-6:]) < 0.9 * sum(kl[:6]), kl
    ce = [r["loss/projector_ce"] for r in rows]
    assert ce[-1] == pytest.approx(ce[0], rel=0.05)  # LR 0: the teacher read-out did not move


def test_projector_learns_only_from_its_own_objective():
    """The KD term sees a detached teacher: the projector's gradient is that of its next-token CE alone."""
    from npt_ds.train.losses import NPTLoss, next_token_ce
    from npt_ds.model.projector import LogitProjector
    from npt_ds.train.module import NPTTrainModule, StepControls
    from npt_ds.config import LossConfig

    torch.manual_seed(0)
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="2,3", rank=4, init_std_b=0.05))
    teacher = tiny_llama({"hidden_size": 96, "intermediate_size": 224}, seed=1)
    projector = LogitProjector(96, 64)
    with torch.no_grad():
        projector.weight.normal_(std=0.2)  # a teacher far from uniform, so KL has a real gradient
    module = NPTTrainModule(model, NPTLoss(LossConfig(kd_weight=1.0, kd_temperature=1.0), 2), teacher, projector)
    ids = torch.randint(0, 256, (2, 16))
    total, comps = module(ids, StepControls(kd_weight=1.0, student_stream=True, want_logits=True))
    assert comps["loss/kd"] > 0.05
    grad_total = torch.autograd.grad(total, [projector.weight], retain_graph=True)[0]
    grad_ce = torch.autograd.grad(next_token_ce(module.cross_width_teacher_logits(ids), ids), [projector.weight])[0]
    torch.testing.assert_close(grad_total, grad_ce, rtol=1e-5, atol=1e-8)
    np_grad = torch.autograd.grad(total, [model.model.layers[3].np.W_down], retain_graph=True)[0]
    assert np_grad.abs().max() > 0  # the student is what KD moves


@pytest.mark.slow
def test_cross_width_kd_with_a_bf16_base_and_fp32_training(tmp_path):
    """model.dtype bfloat16 + deepspeed.precision fp32 (quant.py's advice): the fp32 projector meets a bf16 head."""
    _, rows = tiny_run(tmp_path, *CROSS_WIDTH, "model.dtype=bfloat16", "deepspeed.precision=fp32",
                       "deepspeed.config=ds_configs/zero3_fp32.json", "schedule.total_steps=3")
    assert len(rows) == 3 and all(math.isfinite(r["kd/kl"]) and math.isfinite(r["loss/projector_ce"]) for r in rows)


@pytest.mark.slow
def test_sequential_groups_train_bottom_up_with_the_lower_group_carried(tmp_path):
    """schedule.sequential_group=2 on 4 NPT layers: layers 0-1 train together, then 2-3 while 0-1 are carried."""
    from npt_ds.train.trainer import Trainer

    _, rows = tiny_run(tmp_path, "npt.layers=0-3", "schedule.mode=sequential", "schedule.sequential_group=2",
                       "schedule.total_steps=6", "checkpoint.every=3", "schedule.curriculum=student:100%")
    assert [r["sequential/layer"] for r in rows] == [0, 0, 0, 2, 2, 2]
    first, second = rows[:3], rows[3:]
    assert all("layer/0/direct_mse" in r and "layer/1/direct_mse" in r and "layer/2/direct_mse" not in r for r in first)
    assert all("layer/2/direct_mse" in r and "layer/3/direct_mse" in r and "layer/1/direct_mse" not in r for r in second)
    w3, w6 = (checkpoint_np(tmp_path / "checkpoints" / f"step-{s:08d}") for s in (3, 6))
    for i, moved in ((0, False), (1, False), (2, True), (3, True)):
        key = f"model.layers.{i}.np.W_down"
        assert torch.equal(w3[key], w6[key]) != moved, key
    cfg = load_config("configs/tiny_debug.yaml", [f"logging.run_dir={tmp_path}/bad", "logging.console=false",
                                                  "npt.layers=0-3", "schedule.mode=sequential",
                                                  "schedule.sequential_group=3"])
    with pytest.raises(ConfigError, match=r"schedule.sequential_group: 4 NPT layers do not split into groups of 3; "
                                          r"use one of 1, 2, 4"):
        Trainer(cfg)


@pytest.mark.slow
def test_sequential_layers_start_with_fresh_adam_and_their_own_lr_schedule(tmp_path):
    """Each layer's stage gets warm-up + cosine of its own, and its first Adam update is ~ its LR (not the stale
    moments and step count left by its idle stage, nor a slice of a global decay)."""
    from npt_ds.train.schedules import lr_at

    _, rows = tiny_run(tmp_path, "schedule.mode=sequential", "schedule.total_steps=12", "checkpoint.every=1",
                       "checkpoint.keep_last=0", "schedule.curriculum=student:12", "schedule.warmup_steps=2")
    assert [r["sequential/layer"] for r in rows] == [2] * 6 + [3] * 6
    stage_lr = [lr_at(s, 0.01, 2, 6, 0.1) for s in range(6)]
    assert [r["lr"] for r in rows] == pytest.approx(stage_lr + stage_lr)
    ckpt = tmp_path / "checkpoints"

    def np_weights(step):
        return checkpoint_np(ckpt / f"step-{step:08d}")

    before, after = np_weights(6), np_weights(7)  # layer 3's first step (Adam's |update| <= LR, ~LR at the max)
    for name in ("W_down", "W_a_up", "W_b_up"):
        key = f"model.layers.3.np.{name}"
        step_over_lr = (after[key] - before[key]).abs().max().item() / stage_lr[0]
        assert 0.9 < step_over_lr <= 1.0 + 1e-4, (key, step_over_lr)  # stale moments gave ~0.5 here


@pytest.mark.slow
def test_no_layer_runs_that_no_loss_reads(tmp_path):
    """multi_layer without fidelity / KD: nothing after the last NPT layer runs; at ρ = 0 no student stream."""
    from npt_ds.train.trainer import Trainer

    cfg = load_config("configs/tiny_debug.yaml", [f"logging.run_dir={tmp_path}", "logging.console=false",
                                                  "schedule.mode=multi_layer", "npt.layers=1,2"])
    trainer = Trainer(cfg)
    try:
        model = trainer.module.model
        calls = {"layer3": 0, "attn2": 0}
        model.model.layers[3].register_forward_hook(lambda *a: calls.__setitem__("layer3", calls["layer3"] + 1))
        model.model.layers[2].self_attn.register_forward_hook(lambda *a: calls.__setitem__("attn2", calls["attn2"] + 1))
        ids = torch.randint(0, 256, (2, 16))
        for step, ratio, attn_calls in ((0, 0.0, 1), (8, 0.5, 2), (19, 1.0, 2)):
            controls = trainer.controls(step)
            assert controls.mixing_ratio == ratio
            calls.update(layer3=0, attn2=0)
            loss, _ = trainer.engine(ids, controls)
            assert calls == {"layer3": 0, "attn2": attn_calls}, (ratio, calls)
        with_fidelity = dataclasses.replace(trainer.controls(0), student_stream=True)
        calls.update(layer3=0, attn2=0)
        trainer.engine(ids, with_fidelity)
        assert calls["layer3"] == 2  # fidelity reads the final state: both streams run to the end
    finally:
        trainer.close()
