"""Every loss term against an independent hand computation (explicit loops over plain floats)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from npt_ds.config import ConfigError, LossConfig
from npt_ds.train.losses import (AdaptiveWeighter, NPTLoss, difficulty_token_weights, direct_mse, fidelity_loss,
                           info_bottleneck_loss, kd, modulation_guidance_loss, np_regularization,
                           orthogonality_loss, parse_layer_weights, principal_directions,
                           projection_consistency_loss)
from npt_ds.model.outputs import LayerOutput, NPTForwardOutput

B, T, K, D, FF, V = 2, 3, 2, 4, 5, 7
TOL = 1e-6


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tokens(t: torch.Tensor) -> list:
    """(B, T, ...) tensor -> list of per-token nested lists."""
    return [t[b, s].tolist() for b in range(t.shape[0]) for s in range(t.shape[1])]


def dot(u: list, v: list) -> float:
    return sum(a * b for a, b in zip(u, v))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def cosine(u: list, v: list) -> float:
    return dot(u, v) / max(math.sqrt(dot(u, u)) * math.sqrt(dot(v, v)), 1e-8)


def pop_std(xs: list) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def hand_mse(y: torch.Tensor, t: torch.Tensor, keep_tokens: list | None = None) -> float:
    ys, ts = tokens(y), tokens(t)
    idx = range(len(ys)) if keep_tokens is None else keep_tokens
    return sum((a - b) ** 2 for i in idx for a, b in zip(ys[i], ts[i])) / (len(idx) * y.shape[-1])


def make_layer(index: int, seed: int, scale: float = 1.0) -> LayerOutput:
    v_a, v_b, x = rand(B, T, K, D, seed=seed + 3), rand(B, T, K, FF, seed=seed + 4), rand(B, T, D, seed=seed + 5)
    return LayerOutput(index=index, student_out=rand(B, T, D, seed=seed) * scale,
                       target=rand(B, T, D, seed=seed + 1) * scale, attn=rand(B, T, D, seed=seed + 2),
                       x=x, h_in=rand(B, T, D, seed=seed + 6) * 3.0, coef=torch.einsum("btkd,btd->btk", v_a, x),
                       reg=v_a.pow(2).mean() + v_b.pow(2).mean(), v_a=v_a, v_b=v_b)


def make_output(indices=(14, 15)) -> NPTForwardOutput:
    return NPTForwardOutput(layers=[make_layer(i, seed=10 * n) for n, i in enumerate(indices)],
                            teacher_hidden=rand(B, T, D, seed=100), student_hidden=rand(B, T, D, seed=101),
                            teacher_logits=rand(B, T, V, seed=102) * 2, student_logits=rand(B, T, V, seed=103) * 2)


def test_direct_mse_plain_scaled_and_masked():
    y, t = rand(B, T, D, seed=1), rand(B, T, D, seed=2) * 0.5
    plain = hand_mse(y, t)
    assert direct_mse(y, t).item() == pytest.approx(plain, abs=TOL)
    mean_abs = sum(abs(v) for tok in tokens(t) for v in tok) / (B * T * D)
    assert direct_mse(y, t, layerwise_scaling=True).item() == pytest.approx(plain / mean_abs, abs=TOL)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert direct_mse(y, t, token_weights=mask).item() == pytest.approx(hand_mse(y, t, [0, 2, 5]), abs=TOL)
    # scaling floor: an all-zero target divides by 1e-6, not by 0
    zero = torch.zeros(B, T, D)
    assert direct_mse(y, zero, layerwise_scaling=True).item() == pytest.approx(hand_mse(y, zero) / 1e-6, rel=1e-6)


def test_difficulty_mask_keeps_easiest_tokens():
    y, t = rand(B, T, D, seed=3), rand(B, T, D, seed=4)
    errors = [sum((a - b) ** 2 for a, b in zip(ys, ts)) for ys, ts in zip(tokens(y), tokens(t))]
    easiest = sorted(range(B * T), key=errors.__getitem__)
    for keep, n in ((0.5, 3), (0.4, 3), (0.01, 1), (1.0, 6)):
        mask = difficulty_token_weights(y, t, keep).flatten().tolist()
        assert [i for i, m in enumerate(mask) if m == 1.0] == sorted(easiest[:n])
        assert sum(mask) == n


def test_regularization():
    v_a, v_b = rand(B, T, K, D, seed=5), rand(B, T, K, FF, seed=6)
    mean_a = sum(v ** 2 for tok in tokens(v_a) for row in tok for v in row) / (B * T * K * D)
    mean_b = sum(v ** 2 for tok in tokens(v_b) for row in tok for v in row) / (B * T * K * FF)
    assert np_regularization(v_a, v_b).item() == pytest.approx(mean_a + mean_b, abs=TOL)


def test_fidelity_hidden_logits_both_and_missing():
    out = make_output()
    hidden = hand_mse(out.student_hidden, out.teacher_hidden)
    logits = hand_mse(out.student_logits, out.teacher_logits)
    assert fidelity_loss(out, "hidden").item() == pytest.approx(hidden, abs=TOL)
    assert fidelity_loss(out, "logits").item() == pytest.approx(logits, abs=TOL)
    assert fidelity_loss(out, "both").item() == pytest.approx(hidden + logits, abs=TOL)
    out.student_hidden = None
    with pytest.raises(ValueError, match="student_hidden"):
        fidelity_loss(out, "both")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_is_t2_times_token_mean_kl(temperature):
    zs, zt = rand(B, T, V, seed=7) * 3, rand(B, T, V, seed=8) * 3

    def softmax(z: list) -> list:
        e = [math.exp(v / temperature) for v in z]
        return [v / sum(e) for v in e]

    kls = []
    for s_tok, t_tok in zip(tokens(zs), tokens(zt)):
        ps, pt = softmax(s_tok), softmax(t_tok)
        kls.append(sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps)))
    kl = sum(kls) / len(kls)
    loss, got_kl = kd(zs, zt, temperature)
    assert got_kl.item() == pytest.approx(kl, abs=TOL)
    assert loss.item() == pytest.approx(temperature ** 2 * kl, abs=TOL)
    assert kd(zs, zs, temperature)[1].item() == pytest.approx(0.0, abs=TOL)


def test_modulation_guidance():
    layer = make_layer(0, seed=20)
    m, g = [], []
    for va, x, a, h in zip(tokens(layer.v_a), tokens(layer.x), tokens(layer.attn), tokens(layer.h_in)):
        m.append(sigmoid(sum(dot(va[k], x) for k in range(K))))
        g.append(sigmoid(math.sqrt(dot(a, a)) / math.sqrt(dot(h, h))))
    expected = sum((a - b) ** 2 for a, b in zip(m, g)) / len(m) + max(0.0, pop_std(g) - pop_std(m)) ** 2
    got = modulation_guidance_loss(layer.v_a, layer.x, layer.attn, layer.h_in)
    assert got.item() == pytest.approx(expected, abs=TOL)
    # a collapsed modulation (v_a = 0 -> m = 0.5 everywhere) pays the full target spread squared
    collapsed = modulation_guidance_loss(torch.zeros_like(layer.v_a), layer.x, layer.attn, layer.h_in)
    expected0 = sum((0.5 - b) ** 2 for b in g) / len(g) + pop_std(g) ** 2
    assert collapsed.item() == pytest.approx(expected0, abs=TOL)


def test_info_bottleneck():
    v_a = rand(B, T, K, D, seed=21)
    expected = sum(dot(row, row) for tok in tokens(v_a) for row in tok) / (B * T * K)
    assert info_bottleneck_loss(v_a).item() == pytest.approx(expected, abs=TOL)


def test_orthogonality_against_eigh_basis():
    h_in = rand(4, 8, 6, seed=22) * torch.tensor([5.0, 4.0, 3.0, 1.0, 0.5, 0.2])  # distinct variances
    v_a = rand(4, 8, K, 6, seed=23)
    h = h_in.reshape(-1, 6).double()
    hc = h - h.mean(0)
    evals, evecs = torch.linalg.eigh(hc.T @ hc)  # ascending
    pcs = [evecs[:, -1 - j].tolist() for j in range(2)]
    fractions = [sum(dot(v, p) ** 2 for p in pcs) / dot(v, v) for tok in tokens(v_a) for v in tok]
    assert orthogonality_loss(v_a, h_in, 2).item() == pytest.approx(sum(fractions) / len(fractions), abs=TOL)
    inside = torch.tensor(pcs[0]).float().expand(4, 8, K, 6) * 3.0
    outside = torch.tensor(evecs[:, 0].tolist()).float().expand(4, 8, K, 6)
    assert orthogonality_loss(inside, h_in, 2).item() == pytest.approx(1.0, abs=1e-5)
    assert orthogonality_loss(outside, h_in, 2).item() == pytest.approx(0.0, abs=1e-5)


def test_principal_directions_randomized_regime_matches_eigh():
    g = torch.Generator().manual_seed(24)
    # 300 x 80 with a dominant 3-dim subspace: q = 3 + 8 < min(N, d), so the randomized path is used
    h = torch.randn(300, 80, generator=g) + torch.randn(300, 3, generator=g) @ torch.randn(3, 80, generator=g) * 4
    hc = (h - h.mean(0)).double()
    evecs = torch.linalg.eigh(hc.T @ hc).eigenvectors[:, -3:].flip(1).T.float()
    got = principal_directions(h, 3)
    assert got.shape == (3, 80)
    assert (got @ evecs.T).abs().diagonal().tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    assert torch.equal(principal_directions(h, 3), got)  # deterministic
    state = torch.get_rng_state()
    principal_directions(h, 3)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched


def test_projection_consistency():
    layer = make_layer(0, seed=30)
    sims = [cosine([sum(va[k][j] for k in range(K)) for j in range(D)], a)
            for va, a in zip(tokens(layer.v_a), tokens(layer.attn))]
    expected = sum(1.0 - s for s in sims) / len(sims)
    assert projection_consistency_loss(layer.v_a, layer.attn).item() == pytest.approx(expected, abs=TOL)


def test_layer_weights():
    assert parse_layer_weights("uniform", 4) == [0.25] * 4
    assert parse_layer_weights("linear", 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert parse_layer_weights("2,1,1", 3) == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(ConfigError, match=r"loss\.layer_weights: got 3 weights but there are 4 NPT layers"):
        parse_layer_weights("1.0,0.9,0.8", 4)
    with pytest.raises(ConfigError, match="loss.layer_weights"):
        parse_layer_weights("1.0,abc", 2)
    with pytest.raises(ConfigError, match="loss.layer_weights"):
        parse_layer_weights("1.0,-1.0", 2)


def full_config(**overrides) -> LossConfig:
    base = dict(direct_weight=0.7, layer_weights="3,1", reg_lambda=0.01, fidelity_weight=0.3, fidelity_on="both",
                kd_weight=0.5, kd_temperature=2.0, modulation_guidance=0.2, info_bottleneck=0.05,
                orthogonality=0.4, orthogonality_pcs=2, projection_consistency=0.6)
    return LossConfig(**{**base, **overrides})


def test_total_is_weighted_sum_of_hand_checked_terms():
    out = make_output()
    total, comps = NPTLoss(full_config(), num_layers=2)(out, kd_weight=0.35)
    l14, l15 = out.layers
    direct = 0.75 * hand_mse(l14.student_out, l14.target) + 0.25 * hand_mse(l15.student_out, l15.target)
    expected = {
        "loss/direct": direct,
        "loss/reg": sum(np_regularization(lay.v_a, lay.v_b).item() for lay in out.layers) / 2,
        "loss/fidelity": hand_mse(out.student_hidden, out.teacher_hidden)
        + hand_mse(out.student_logits, out.teacher_logits),
        "loss/kd": kd(out.student_logits, out.teacher_logits, 2.0)[0].item(),
        "kd/kl": kd(out.student_logits, out.teacher_logits, 2.0)[1].item(),
        "loss/guidance/modulation": sum(modulation_guidance_loss(lay.v_a, lay.x, lay.attn, lay.h_in).item()
                                        for lay in out.layers) / 2,
        "loss/guidance/info_bottleneck": sum(info_bottleneck_loss(lay.v_a).item() for lay in out.layers) / 2,
        "loss/guidance/orthogonality": sum(orthogonality_loss(lay.v_a, lay.h_in, 2).item() for lay in out.layers) / 2,
        "loss/guidance/projection_consistency": sum(projection_consistency_loss(lay.v_a, lay.attn).item()
                                                    for lay in out.layers) / 2,
    }
    for key, value in expected.items():
        assert comps[key].item() == pytest.approx(value, abs=TOL), key
    weighted = (0.7 * expected["loss/direct"] + 0.01 * expected["loss/reg"] + 0.3 * expected["loss/fidelity"]
                + 0.35 * expected["loss/kd"] + 0.2 * expected["loss/guidance/modulation"]
                + 0.05 * expected["loss/guidance/info_bottleneck"] + 0.4 * expected["loss/guidance/orthogonality"]
                + 0.6 * expected["loss/guidance/projection_consistency"])
    assert total.item() == pytest.approx(weighted, abs=TOL)
    assert comps["loss/total"].item() == pytest.approx(weighted, abs=TOL)
    for lay in out.layers:
        i = lay.index
        assert comps[f"layer/{i}/direct_mse"].item() == pytest.approx(hand_mse(lay.student_out, lay.target), abs=TOL)
        va_norm = sum(math.sqrt(dot(r, r)) for tok in tokens(lay.v_a) for r in tok) / (B * T * K)
        vb_norm = sum(math.sqrt(dot(r, r)) for tok in tokens(lay.v_b) for r in tok) / (B * T * K)
        assert comps[f"layer/{i}/v_a_norm"].item() == pytest.approx(va_norm, abs=TOL)
        assert comps[f"layer/{i}/v_b_norm"].item() == pytest.approx(vb_norm, abs=TOL)
        sim = sum(abs(cosine(va[k], a)) for va, a in zip(tokens(lay.v_a), tokens(lay.attn))
                  for k in range(K)) / (B * T * K)
        assert comps[f"layer/{i}/v_a_attn_sim"].item() == pytest.approx(sim, abs=TOL)
    per_layer = {f"layer/{i}/{m}" for i in (14, 15) for m in ("direct_mse", "v_a_norm", "v_b_norm", "v_a_attn_sim")}
    assert set(comps) == {"loss/total", *expected} | per_layer


def test_components_detached_and_disabled_terms_absent():
    out = make_output()
    y = out.layers[0].student_out.requires_grad_(True)
    total, comps = NPTLoss(LossConfig(), num_layers=2)(out)  # defaults: direct + reg only
    assert total.requires_grad
    assert {k for k in comps if k.startswith(("loss/", "kd/"))} == {"loss/total", "loss/direct", "loss/reg"}
    for key, value in comps.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    total.backward()
    assert y.grad is not None
    expected = 0.5 * hand_mse(out.layers[0].student_out.detach(), out.layers[0].target) \
        + 0.5 * hand_mse(out.layers[1].student_out, out.layers[1].target)
    assert comps["loss/direct"].item() == pytest.approx(expected, abs=TOL)


def test_layerwise_scaling_and_difficulty_mask_through_module():
    out = make_output()
    cfg = LossConfig(layer_weights="uniform", reg_lambda=0.0, layerwise_scaling=True, difficulty_mask=True)
    _, comps = NPTLoss(cfg, num_layers=2)(out, difficulty_keep=0.5)
    expected = 0.0
    for lay in out.layers:
        errors = [sum((a - b) ** 2 for a, b in zip(ys, ts)) for ys, ts in zip(tokens(lay.student_out),
                                                                                  tokens(lay.target))]
        kept = sorted(range(B * T), key=errors.__getitem__)[:3]
        mean_abs = sum(abs(v) for tok in tokens(lay.target) for v in tok) / (B * T * D)
        expected += 0.5 * hand_mse(lay.student_out, lay.target, kept) / mean_abs
    assert comps["loss/direct"].item() == pytest.approx(expected, abs=TOL)
    # the logged per-layer MSE stays the raw one
    lay = out.layers[0]
    assert comps["layer/14/direct_mse"].item() == pytest.approx(hand_mse(lay.student_out, lay.target), abs=TOL)


def test_missing_tensors_give_clear_errors():
    out = make_output()
    out.student_logits = None
    with pytest.raises(ValueError, match="loss.kd_weight"):
        NPTLoss(LossConfig(kd_weight=0.5), num_layers=2)(out, kd_weight=0.5)
    with pytest.raises(ValueError, match="fidelity"):
        NPTLoss(LossConfig(fidelity_weight=1.0, fidelity_on="logits"), num_layers=2)(out)
    NPTLoss(LossConfig(fidelity_weight=1.0, fidelity_on="hidden"), num_layers=2)(out)  # hidden still there
    for lay in out.layers:
        lay.target = None
    with pytest.raises(ValueError, match="loss.direct_weight"):
        NPTLoss(LossConfig(), num_layers=2)(out)
    with pytest.raises(ValueError, match="built for 3 NPT layers"):
        NPTLoss(LossConfig(), num_layers=3)(make_output())


def test_adaptive_weighter_ema_and_normalisation():
    p = torch.nn.Parameter(torch.ones(4))
    weighter = AdaptiveWeighter(ema=0.9)
    terms = {"a": 1.5 * p.sum(), "b": 6.0 * p.sum()}  # grad norms 3 and 12
    w = weighter.update(terms, [p])
    weighter.commit()
    assert weighter.norms["a"].item() == pytest.approx(3.0) and weighter.norms["b"].item() == pytest.approx(12.0)
    assert w["a"].item() == pytest.approx(1.6) and w["b"].item() == pytest.approx(0.4)  # ∝ 1/3 : 1/12, mean 1
    w = weighter.update({"a": 0.5 * p.sum(), "b": 6.0 * p.sum()}, [p])  # norm of a now 1
    weighter.commit()
    ema_a = 0.9 * 3.0 + 0.1 * 1.0
    assert weighter.norms["a"].item() == pytest.approx(ema_a)
    inv = [1 / ema_a, 1 / 12.0]
    assert w["a"].item() == pytest.approx(2 * inv[0] / sum(inv))
    assert p.grad is None  # autograd.grad never accumulates into .grad
    frozen = weighter.update({"a": 1.5 * p.sum(), "c": torch.tensor(2.0)}, [p])
    assert frozen["c"].item() == 1.0  # no gradient path -> weight 1, excluded from the mean


def adaptive_output(p: torch.nn.Parameter, fidelity_scale: float) -> NPTForwardOutput:
    out = make_output(indices=(3,))
    lay = out.layers[0]
    lay.student_out = lay.student_out * p  # direct depends on p
    out.student_hidden = fidelity_scale * (out.student_hidden * p.flip(0))
    out.teacher_hidden = fidelity_scale * out.teacher_hidden
    return out


def test_adaptive_weighting_term_scaled_100x_gets_100x_smaller_weight():
    cfg = LossConfig(reg_lambda=0.0, fidelity_weight=1.0, adaptive_weighting=True, adaptive_ema=0.5)
    ratios = {}
    for scale in (1.0, 10.0):  # hidden ×10 -> fidelity term (and its gradient) ×100
        p = torch.nn.Parameter(torch.linspace(0.5, 1.5, D))
        loss = NPTLoss(cfg, num_layers=1)
        for _ in range(4):
            out = adaptive_output(p, scale)
            total, comps = loss(out, params=[p])
            loss.finish_micro_batch(finite=True)
        assert (comps["weight/direct"] + comps["weight/fidelity"]).item() == pytest.approx(2.0, abs=1e-5)
        assert total.item() == pytest.approx((comps["weight/direct"] * comps["loss/direct"]
                                              + comps["weight/fidelity"] * comps["loss/fidelity"]).item(), rel=1e-6)
        ratios[scale] = (comps["weight/fidelity"] / comps["weight/direct"]).item()
        assert ratios[scale] != pytest.approx(1.0, abs=1e-3)  # real gradient norms, not d loss / d loss
    assert ratios[10.0] == pytest.approx(ratios[1.0] / 100.0, rel=1e-4)


def test_adaptive_needs_params_in_training_and_freezes_in_eval():
    cfg = LossConfig(adaptive_weighting=True)
    loss = NPTLoss(cfg, num_layers=2)
    with pytest.raises(ValueError, match="params"):
        loss(make_output())
    loss.eval()
    _, comps = loss(make_output())
    assert comps["weight/direct"].item() == 1.0 and not loss.adaptive.norms


def adaptive_steps(loss: NPTLoss, p: torch.nn.Parameter, scales: list[float]) -> dict[str, float]:
    """Training micro-batches as the trainer runs them: forward, all-ranks finite check, commit or skip."""
    for scale in scales:
        total, comps = loss(adaptive_output(p, scale), params=[p])
        loss.finish_micro_batch(finite=bool(torch.isfinite(total)))
    return {k: v.item() for k, v in loss.adaptive.weights(["direct", "fidelity"]).items()}


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_one_bad_micro_batch_leaves_adaptive_weighting_as_if_it_was_never_seen(bad):
    """The review's repro: one Inf fidelity step, then 50 good ones gave {'direct': 2.0, 'fidelity': 0.0}."""
    cfg = LossConfig(reg_lambda=0.0, fidelity_weight=1.0, adaptive_weighting=True, adaptive_ema=0.9)
    p = torch.nn.Parameter(torch.linspace(0.5, 1.5, D))
    clean = adaptive_steps(NPTLoss(cfg, num_layers=1), p, [1.0] * 50)
    after_bad = adaptive_steps(NPTLoss(cfg, num_layers=1), p, [bad] + [1.0] * 50)
    assert after_bad == pytest.approx(clean, rel=1e-6)
    assert 0.05 < after_bad["fidelity"] < 1.95 and after_bad["direct"] + after_bad["fidelity"] == pytest.approx(2.0)


def test_a_non_finite_norm_with_a_finite_loss_never_enters_the_ema():
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    weighter = AdaptiveWeighter(ema=0.5)
    weighter.update({"a": 2.0 * p.sum(), "b": p.sum()}, [p])
    weighter.commit()
    w = weighter.update({"a": 2.0 * p.sum(), "b": p.abs().sqrt().sum()}, [p])  # value 1, gradient inf at 0
    weighter.commit()
    assert weighter.norms["b"].item() == pytest.approx(math.sqrt(2.0))  # kept from the first update
    assert all(math.isfinite(v.item()) for v in w.values())
    state = weighter.state_dict()
    restored = AdaptiveWeighter(ema=0.5)
    restored.load_state_dict(json.loads(json.dumps(state)))  # through meta.json
    assert {k: v.item() for k, v in restored.weights(["a", "b"]).items()} == \
        {k: v.item() for k, v in weighter.weights(["a", "b"]).items()}
