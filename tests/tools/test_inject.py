"""Knowledge injection: the fold equals running the model with the context's modulation applied (fp64, exact),
alpha scaling, differential mode, save/load/accumulate/reset, and one-line errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from support.npt import strong_npt
from npt_ds.cli import main
from npt_ds.model import (Modulation, context_deltas, inject, load_np_weights, npt_layers,
                          save_np_weights, set_mode, tiny_llama)


def manual_attention(model: nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The attention outputs driving each NPT layer, by an explicit walk: RoPE cos/sin for positions 0..T-1 and an
    explicit additive causal mask (independent of the HF forward that the injection code hooks)."""
    inner = model.model
    t = ids.shape[1]
    h = inner.embed_tokens(ids)
    cos_sin = inner.rotary_emb(h, position_ids=torch.arange(t)[None])
    mask = torch.full((t, t), float("-inf"), dtype=h.dtype).triu(1)[None, None]
    attn = {}
    for layer in inner.layers:
        if hasattr(layer, "np"):
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask,
                                   position_embeddings=cos_sin)
            attn[layer.layer_idx] = a[0]
            h = h + layer.student_mlp(h, a)[0]
        else:
            h = layer(h, attention_mask=mask, position_embeddings=cos_sin)
    return attn


def with_context_modulation(model: nn.Module, attn: dict[int, torch.Tensor], weights: torch.Tensor, alpha: float):
    """Hooks that add alpha·s·Σ_t w_t Σ_k v_b,k(t)(v_a,k(t)·x) to each NPT layer's W_gate x (and v_c to W_up x)."""
    hooks = []
    for layer in npt_layers(model):
        mod = Modulation(*layer.np(attn[layer.layer_idx]))
        s = alpha * layer.modulation_scale

        def adder(v, v_a=mod.v_a, s=s):
            def hook(_, inp, out):
                coef = torch.einsum("tkd,nd->ntk", v_a, inp[0])  # (N, T_ctx, k)
                return out + s * torch.einsum("t,ntk,tkf->nf", weights, coef, v)
            return hook

        hooks.append(layer.mlp.gate_proj.register_forward_hook(adder(mod.v_b)))
        if mod.v_c is not None:
            hooks.append(layer.mlp.up_proj.register_forward_hook(adder(mod.v_c)))
    return hooks


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("positions,weights", [("last", [0, 0, 0, 0, 0, 0, 0, 0, 1]),
                                               ("2:6", [0, 0, .25, .25, .25, .25, 0, 0, 0]),
                                               ("all", [1] * 9)])
def test_fold_equals_running_with_the_context_modulation(dual, positions, weights):
    model = strong_npt(dual)
    ctx = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    query = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    plain = model(input_ids=query).logits
    with torch.no_grad():
        attn = manual_attention(model, ctx)
        hooks = with_context_modulation(model, attn, torch.tensor(weights, dtype=torch.float64), alpha=0.7)
        want = model(input_ids=query).logits
        for h in hooks:
            h.remove()
    folded = copy.deepcopy(model)
    inject(folded, ctx, {"context": "ctx"}, positions=positions, alpha=0.7)
    got = folded(input_ids=query).logits
    assert (want - plain).abs().max() > 1e-2  # the context's modulation matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_injection_reads_the_causal_model():
    """The last token's modulation of a prefix is the same as that token's inside the longer context."""
    model = strong_npt()
    ctx = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    full = context_deltas(model, ctx, positions="4:5")
    prefix = context_deltas(model, ctx[:, :5], positions="last")
    for name in full:
        torch.testing.assert_close(full[name], prefix[name], rtol=0, atol=1e-12)


def test_alpha_scales_the_update_linearly():
    model = strong_npt(dual=True)
    ctx = torch.randint(0, 256, (1, 6))
    one = context_deltas(model, ctx, alpha=1.0)
    assert set(one) == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 3) for p in ("gate", "up")}
    for alpha in (0.25, 2.0, -1.0):
        scaled = context_deltas(model, ctx, alpha=alpha)
        for name in one:
            torch.testing.assert_close(scaled[name], alpha * one[name], rtol=1e-12, atol=0)
    assert all(float(d.abs().max()) == 0.0 for d in context_deltas(model, ctx, alpha=0.0).values())


def test_differential_injection_is_the_difference_of_the_two_updates():
    model = strong_npt()
    ctx, base = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 5))
    diff = context_deltas(model, ctx, baseline_ids=base, alpha=0.5, positions="mean")
    a, b = context_deltas(model, ctx, positions="mean"), context_deltas(model, base, positions="mean")
    for name in diff:
        torch.testing.assert_close(diff[name], 0.5 * (a[name] - b[name]), rtol=0, atol=1e-12)
    same = context_deltas(model, ctx, baseline_ids=ctx)
    assert all(float(d.abs().max()) == 0.0 for d in same.values())


def test_injections_survive_save_load_accumulate(tmp_path):
    model = strong_npt().float()
    ctx1, ctx2 = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 4))
    query = torch.randint(0, 256, (1, 5))
    before = model(input_ids=query).logits
    inject(model, ctx1, {"context": "one"}, layers=[1])
    inject(model, ctx2, {"context": "two"}, layers=[1, 3], alpha=2.0)
    want = model(input_ids=query).logits
    save_np_weights(model, tmp_path)
    fresh = tiny_llama()
    load_np_weights(fresh, tmp_path)
    set_mode(fresh, "student")
    torch.testing.assert_close(fresh(input_ids=query).logits, want, rtol=0, atol=1e-5)
    assert [r["context"] for r in fresh.npt_injections.records] == ["one", "two"]
    plain = tiny_llama()
    load_np_weights(plain, tmp_path, injections=False)
    set_mode(plain, "student")
    torch.testing.assert_close(plain(input_ids=query).logits, before, rtol=0, atol=1e-5)


def _np_dir(tmp_path):
    assert main(["convert", "--model", "tiny", "--layers", "1,2", "--rank", "4", "--out", str(tmp_path / "np")]) == 0
    return str(tmp_path / "np")


def test_inject_cli_accumulates_and_resets(tmp_path, capsys):
    np_dir, out = _np_dir(tmp_path), str(tmp_path / "inj")
    base = ["inject", "--model", "tiny", "--np"]
    assert main(base + [np_dir, "--context", "The sky is green.", "--out", out]) == 0
    assert main(base + [out, "--context", "Grass is blue.", "--baseline", "Grass is.", "--layers", "2",
                        "--positions", "mean", "--alpha", "0.5", "--out", out]) == 0
    model = tiny_llama()
    load_np_weights(model, out)
    assert [(r["context"], r["baseline"], r["layers"], r["positions"], r["alpha"])
            for r in model.npt_injections.records] == [("The sky is green.", None, [1, 2], "last", 1.0),
                                                       ("Grass is blue.", "Grass is.", [2], "mean", 0.5)]
    assert main(base + [out, "--reset", "--out", out]) == 0
    assert not (tmp_path / "inj" / "injections.json").exists()
    assert "0 injection(s)" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [
    (["--context", "Hi there", "--layers", "0"], "--layers: layer 0 is not an NPT layer"),
    (["--context", "Hi there", "--layers", "9"], "--layers: layer 9 is out of range; the model has 4 layers"),
    (["--context", "   "], "--context: the text is empty"),
    (["--context", "Hi", "--positions", "1:5"], "--positions 1:5: out of range for a context of 2 tokens"),
    (["--context", "Hi", "--positions", "first"], "--positions: unknown 'first'"),
    ([], "--context: give the text to inject"),
])
def test_inject_errors_are_one_line(tmp_path, capsys, extra, msg):
    np_dir = _np_dir(tmp_path)
    capsys.readouterr()
    assert main(["inject", "--model", "tiny", "--np", np_dir, "--out", str(tmp_path / "x")] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err, err


def test_eval_loads_the_saved_injections(tmp_path, capsys):
    np_dir, out = _np_dir(tmp_path), str(tmp_path / "inj")
    model = tiny_llama()
    load_np_weights(model, np_dir)
    with torch.no_grad():
        for layer in npt_layers(model):
            for p in layer.np.parameters():
                p.normal_(std=0.5)
    save_np_weights(model, np_dir)
    assert main(["inject", "--model", "tiny", "--np", np_dir, "--context", "All the world's a stage.",
                 "--alpha", "3", "--out", out]) == 0
    ppl = {}
    for name, d in (("plain", np_dir), ("injected", out)):
        capsys.readouterr()
        assert main(["eval", "--model", "tiny", "--np", d, "--batches", "1", "--seq-len", "32"]) == 0
        text = capsys.readouterr().out
        ppl[name] = float(text.split("NPT perplexity")[1].split()[0])
        assert ("1 injection(s)" in text) == (name == "injected")
    assert ppl["plain"] != ppl["injected"]
