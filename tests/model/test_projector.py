"""Logit projector: init per spec, teacher logits through the student embedding, and the KL > 8 diagnosis."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from npt_ds.train.losses import kd
from npt_ds.model.projector import LogitProjector


def test_init_and_teacher_logits():
    torch.manual_seed(0)
    proj = LogitProjector(256, 128)
    assert isinstance(proj, nn.Linear) and proj.weight.shape == (128, 256)
    assert proj.weight.std().item() == pytest.approx(0.01, rel=0.03)
    assert proj.weight.mean().abs().item() < 1e-3
    assert torch.equal(proj.bias, torch.zeros(128))
    h, emb = torch.randn(2, 3, 256), torch.randn(11, 128)
    expected = torch.einsum("btd,vd->btv", h @ proj.weight.T + proj.bias, emb)
    assert torch.allclose(proj.teacher_logits(h, emb), expected, atol=1e-5)


def test_random_projector_kl_far_above_spec_init():
    """A std-1 projector turns the teacher into a near one-hot on an arbitrary token: KL > 8 nats.

    Realistic scales: final hidden states come out of an RMSNorm (unit RMS per element); the student
    output embedding has entries of std 2/sqrt(d_s), so student logits have std ~2, the spread of a
    trained LM's next-token logits.  The student's hidden state is a linear read-out of the teacher's.
    With the spec init (std 0.01) the projected teacher logits have std ~0.2: the teacher is close to
    uniform and KL(p_T || p_S) ~ sigma_S^2 / 2 ~ 2.  With std 1 the teacher logits have std ~20 and the
    KL is ~log V + sigma_S^2 / 2 ~ 10.3 for V = 4096, the "something is random/broken" signature.
    """
    g = torch.Generator().manual_seed(0)
    vocab, d_s, d_t, n_tok = 4096, 64, 96, 64
    emb = torch.randn(vocab, d_s, generator=g) * (2.0 / math.sqrt(d_s))
    h_t = torch.randn(1, n_tok, d_t, generator=g)
    h_s = h_t @ (torch.randn(d_t, d_s, generator=g) / math.sqrt(d_t))
    student_logits = h_s @ emb.T
    assert student_logits.std().item() == pytest.approx(2.0, rel=0.1)

    torch.manual_seed(0)
    spec = LogitProjector(d_t, d_s)
    broken = LogitProjector(d_t, d_s)
    nn.init.normal_(broken.weight, std=1.0)
    nn.init.normal_(broken.bias, std=1.0)
    with torch.no_grad():
        kl_spec = kd(student_logits, spec.teacher_logits(h_t, emb), 1.0)[1].item()
        kl_broken = kd(student_logits, broken.teacher_logits(h_t, emb), 1.0)[1].item()
    assert kl_spec < 3.0
    assert kl_broken > 8.0
    assert kl_broken > 3.0 * kl_spec
