"""CUDA (bf16) against CPU (fp32): evaluation, a training step with every loss term, cross-width KD.

Tolerances (relative, stated per assert): bf16 keeps 8 significant bits, so a loss or perplexity summed over many
tokens agrees to ~1e-3..1e-2 and a per-layer MSE to a few 1e-2; NP gradients are compared by direction (cosine).
"""
from __future__ import annotations

import pytest
import torch

from support.cuda import assert_close_rel, cosine, on
from npt_ds.config import LossConfig, NPTConfig
from npt_ds.model import convert_model, np_named_parameters, tiny_llama
from npt_ds.model.projector import LogitProjector
from npt_ds.train.evaluate import evaluate
from npt_ds.train.losses import NPTLoss
from npt_ds.train.module import NPTTrainModule, StepControls

pytestmark = pytest.mark.cuda
BF16 = torch.bfloat16
ALL_TERMS = LossConfig(fidelity_weight=1.0, fidelity_on="both", kd_weight=0.5, modulation_guidance=0.1,
                       orthogonality=0.1, projection_consistency=0.1, info_bottleneck=0.1, adaptive_weighting=True,
                       layerwise_scaling=True, reg_lambda=1e-3)


def trained_npt(**npt) -> torch.nn.Module:
    """The tiny Llama with NPT layers 1 and 3 whose NP weights are off their near-zero init (as after training)."""
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="1,3", rank=8, **npt))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in np_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def batches(n: int = 2, seq: int = 64) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def step(module: NPTTrainModule, ids: torch.Tensor, controls: StepControls) -> tuple[dict, dict]:
    """One micro-batch's loss components and NP gradients (fp32 on the host)."""
    loss, comps = module(ids, controls)
    module.loss_fn.finish_micro_batch(True)
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in module.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in comps.items() if v.dim() == 0}, grads


def test_evaluate_on_cuda_bf16(cuda_device):
    model = trained_npt()
    data = batches()
    want = evaluate(model, data, device="cpu")
    got = evaluate(on(model, cuda_device, BF16), data, device=cuda_device)
    assert got["eval/tokens"] == want["eval/tokens"]
    for key in ("eval/ppl_base", "eval/ppl_npt"):
        assert_close_rel(got[key], want[key], 0.01, key)  # perplexity within 1 %
    for key in [k for k in want if "direct_mse" in k] + ["eval/fidelity_mse"]:
        assert_close_rel(got[key], want[key], 0.05, key)  # per-layer and fidelity MSE within 5 %


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_training_step_with_every_loss_term_on_cuda_bf16(cuda_device, ratio):
    model = trained_npt(dual=True, multiplicative=True)
    ids = batches(1)[0]
    controls = StepControls(mixing_ratio=ratio, kd_weight=0.3, student_stream=True, want_logits=True,
                            diagnostics=True)
    want, want_grads = step(NPTTrainModule(model, NPTLoss(ALL_TERMS, 2)), ids, controls)
    got, grads = step(NPTTrainModule(on(model, cuda_device, BF16), NPTLoss(ALL_TERMS, 2)), ids.to(cuda_device),
                      controls)
    assert {"loss/kd", "loss/fidelity", "loss/guidance/orthogonality", "weight/direct"} <= set(want)
    assert set(got) == set(want)
    for key, value in want.items():
        tol = 0.05 if key.startswith(("loss/guidance", "layer/", "weight/")) else 0.02
        assert_close_rel(got[key], value, tol, key)  # objectives within 2 %, guidance/diagnostics within 5 %
    assert set(grads) == set(want_grads)
    for name, g in want_grads.items():
        assert cosine(grads[name], g) > 0.99, name  # every NP gradient points the same way


def test_cross_width_kd_on_cuda_bf16(cuda_device):
    model = trained_npt()
    teacher = tiny_llama({"hidden_size": 96, "intermediate_size": 224}, seed=1)
    projector = LogitProjector(96, 64)
    ids = batches(1)[0]
    controls = StepControls(kd_weight=1.0, student_stream=True, want_logits=True, diagnostics=False)
    cfg = LossConfig(kd_weight=1.0)
    want, want_grads = step(NPTTrainModule(model, NPTLoss(cfg, 2), teacher, projector), ids, controls)
    module = NPTTrainModule(on(model, cuda_device, BF16), NPTLoss(cfg, 2), on(teacher, cuda_device, BF16),
                            on(projector, cuda_device, BF16))
    got, grads = step(module, ids.to(cuda_device), controls)
    for key in ("loss/kd", "kd/kl", "loss/projector_ce", "loss/total"):
        assert_close_rel(got[key], want[key], 0.02, key)  # within 2 %
    assert "logit_projector.weight" in grads
    for name, g in want_grads.items():
        assert cosine(grads[name], g) > 0.99, name
