"""The NPT training objective, as pure per-term functions plus one module that combines them.

``total = Σ_name coef_name · a_name · term_name`` over the enabled terms (component key, coefficient):

* ``loss/direct`` = Σ_i w_i · MSE(y_i, target_i) (:func:`direct_mse`); ``loss.direct_weight``.  The target is
  what the teacher layer added (``loss.direct_target: delta``) or, for a layer reading the student stream,
  h_T,i+1 − h_in,i (``state``: the layer also corrects the drift of the layers below it).
* ``loss/reg`` = mean over NPT layers of (mean v_a² + mean v_b²) (``LayerOutput.reg``, computed by the NP
  component without forming the vectors); ``loss.reg_lambda``.
* ``loss/fidelity`` = :func:`fidelity_loss` on hidden states / logits / both; ``loss.fidelity_weight``.
* ``loss/kd`` = T² · KL(p_T ‖ p_S) (:func:`kd`; ``kd/kl`` is the KL before T²); the ``kd_weight``
  argument, i.e. the warmed-up α_kd from :func:`npt_ds.train.schedules.kd_weight_at`.  KD is enabled by
  ``loss.kd_weight`` (α_kd) > 0.
* ``loss/guidance/<name>`` = guidance term averaged over NPT layers; its ``loss.*`` weight (see GUIDANCE).

A term is enabled when its config weight is > 0 and absent from the components otherwise.  ``a_name``
is 1 unless adaptive weighting is on (:class:`AdaptiveWeighter`, applied to the objectives ``direct``,
``fidelity`` and ``kd`` only: the regulariser and guidance terms keep their fixed strengths, since an
inverse-gradient weight would inflate a penalty exactly when it is already satisfied).  Components
are *unweighted* term values, detached 0-dim tensors, never ``.item()``-ed here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import GUIDANCE, ConfigError, LossConfig
from ..model.diagnostics import vector_stats
from ..model.np_component import NPExtras
from ..model.outputs import LayerOutput, NPTForwardOutput

ADAPTIVE_TERMS = ("direct", "fidelity", "kd")
SCALE_FLOOR = 1e-6  # lower clamp of mean|target| in layer-wise scaling


def parse_layer_weights(spec: str, num_layers: int) -> list[float]:
    """Per-NPT-layer weights w_i (in the order of ``NPTForwardOutput.layers``), always summing to 1.

    ``uniform``: 1/n each.  ``linear``: w_i ∝ i + 1 (i = 0 for the shallowest NPT layer), so deeper
    layers weigh more.  ``"1.0,0.9,..."``: one non-negative weight per NPT layer, divided by their sum.
    """
    if spec == "uniform":
        raw = [1.0] * num_layers
    elif spec == "linear":
        raw = [float(i + 1) for i in range(num_layers)]
    else:
        try:
            raw = [float(tok) for tok in spec.split(",")]
        except ValueError:
            raise ConfigError(f"loss.layer_weights: {spec!r} is not uniform, linear or a comma list of "
                              "numbers such as 1.0,0.9") from None
        if len(raw) != num_layers:
            raise ConfigError(f"loss.layer_weights: got {len(raw)} weights but there are {num_layers} NPT "
                              f"layers; give exactly {num_layers} comma-separated weights or use uniform/linear")
        if any(not math.isfinite(w) or w < 0 for w in raw) or sum(raw) <= 0:
            raise ConfigError(f"loss.layer_weights: {spec!r} must be finite, non-negative and not all zero")
    total = sum(raw)
    return [w / total for w in raw]


def difficulty_token_weights(student: torch.Tensor, target: torch.Tensor, keep: float) -> torch.Tensor:
    """(B, T) 0/1 mask keeping the ``max(1, ceil(keep · B·T))`` easiest tokens.

    Difficulty of token (b, t) = mean over features of (y − target)², detached; the lowest are kept.
    """
    err = (student.detach() - target.detach()).float().pow(2).mean(-1).flatten()
    n_keep = max(1, math.ceil(keep * err.numel()))
    mask = torch.zeros_like(err)
    mask[torch.topk(err, n_keep, largest=False).indices] = 1.0
    return mask.view(student.shape[:-1])


def direct_mse(student: torch.Tensor, target: torch.Tensor, layerwise_scaling: bool = False,
               token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Plain MSE over all elements, no per-vector normalisation.

    With ``token_weights`` w (B, T): Σ_bt w_bt Σ_f (y − t)² / (F · Σ_bt w_bt).  With layer-wise
    scaling the result is divided by ``max(mean|target|, 1e-6)`` (detached, over all tokens).
    """
    sq = (student.float() - target.float()).pow(2)
    if token_weights is None:
        mse = sq.mean()
    else:
        w = token_weights.to(sq.dtype)
        mse = (sq.sum(-1) * w).sum() / (w.sum() * sq.shape[-1])
    if layerwise_scaling:
        mse = mse / target.detach().float().abs().mean().clamp_min(SCALE_FLOOR)
    return mse


def np_regularization(v_a: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """mean(v_a²) + mean(v_b²) of one layer (means over every element)."""
    return v_a.float().pow(2).mean() + v_b.float().pow(2).mean()


def fidelity_loss(out: NPTForwardOutput, on: str) -> torch.Tensor:
    """MSE(student, teacher) of the final hidden states (``hidden``), the logits (``logits``) or the sum (``both``).

    Raises ``ValueError`` when a needed tensor is missing from the forward output.
    """
    pairs = {"hidden": [("student_hidden", "teacher_hidden")], "logits": [("student_logits", "teacher_logits")]}
    pairs["both"] = pairs["hidden"] + pairs["logits"]
    total = None
    for s_name, t_name in pairs[on]:
        s, t = getattr(out, s_name), getattr(out, t_name)
        if s is None or t is None:
            missing = s_name if s is None else t_name
            raise ValueError(f"loss.fidelity_weight > 0 with fidelity_on={on!r} needs {missing}, which the forward "
                             "did not return; enable the student stream / logits or set loss.fidelity_weight: 0")
        term = F.mse_loss(s.float(), t.float())
        total = term if total is None else total + term
    return total


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T² · KL, KL)`` with KL = mean over tokens of Σ_v p_T,v (log p_T,v − log p_S,v), p = softmax(z / T)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"KD needs student and teacher logits of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / log_s.shape[0]
    return temperature ** 2 * kl, kl


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (fp32) of (B, T, V) logits on (B, T) ids: position t predicts id t + 1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].reshape(-1), reduction=reduction)


def modulation_coefficient(v_a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_k v_a,k · x per token: (B, T, k, d), (B, T, d) -> (B, T)."""
    return torch.einsum("btkd,btd->bt", v_a.float(), x.float())


def modulation_guidance_loss(v_a: torch.Tensor, x: torch.Tensor, attn: torch.Tensor,
                             h_in: torch.Tensor) -> torch.Tensor:
    """Modulation strength should follow attention strength, and must not collapse.

    m = sigmoid(Σ_k v_a,k·x), g = sigmoid(‖a‖ / max(‖h_in‖, 1e-6)) per token (g detached);
    loss = mean (m − g)² + relu(std(g) − std(m))², stds (population) over all B·T tokens.
    """
    m = torch.sigmoid(modulation_coefficient(v_a, x)).flatten()
    ratio = attn.detach().float().norm(dim=-1) / h_in.detach().float().norm(dim=-1).clamp_min(1e-6)
    g = torch.sigmoid(ratio).flatten()
    spread = F.relu(g.std(unbiased=False) - m.std(unbiased=False))
    return (m - g).pow(2).mean() + spread.pow(2)


def info_bottleneck_loss(v_a: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and ranks of the squared L2 norm ‖v_a,k‖² (limits what the NP channel carries)."""
    return v_a.float().pow(2).sum(-1).mean()


def principal_directions(h: torch.Tensor, num: int, oversample: int = 8, iters: int = 4) -> torch.Tensor:
    """(p, d) top right singular vectors of the centred rows of h (N, d), p = min(num, N, d).

    Randomized subspace iteration (fixed seed, so the global RNG is untouched) of width
    q = min(num + oversample, N, d); exact when q = min(N, d), cheap for large N and d.
    """
    h = h - h.mean(0, keepdim=True)
    q = min(num + oversample, *h.shape)
    gen = torch.Generator(device=h.device).manual_seed(0)
    basis = torch.linalg.qr(h @ torch.randn(h.shape[1], q, generator=gen, device=h.device, dtype=h.dtype)).Q
    for _ in range(iters):
        basis = torch.linalg.qr(h @ torch.linalg.qr(h.T @ basis).Q).Q
    return torch.linalg.svd(basis.T @ h, full_matrices=False).Vh[: min(num, *h.shape)]


def orthogonality_loss(v_a: torch.Tensor, h_in: torch.Tensor, num_pcs: int) -> torch.Tensor:
    """Fraction of v_a's energy in the top principal subspace of h_in.

    P = :func:`principal_directions` of the batch's h_in rows (B·T, d), detached, ``num_pcs`` of them.
    loss = mean over (b, t, k) of ‖P v_a‖² / max(‖v_a‖², 1e-12) ∈ [0, 1].
    """
    d = h_in.shape[-1]
    basis = principal_directions(h_in.detach().float().reshape(-1, d), num_pcs)
    v = v_a.float().reshape(-1, d)
    return ((v @ basis.T).pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-12)).mean()


def projection_consistency_loss(v_a: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """mean over tokens of 1 − cos(Σ_k v_a,k, a), the attention output detached."""
    return 1.0 - attn_similarity(v_a, attn.detach())


def attn_similarity(v_a: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """mean over tokens of cos(Σ_k v_a,k, a) (cosine eps 1e-8)."""
    return F.cosine_similarity(v_a.float().sum(-2), attn.float(), dim=-1, eps=1e-8).mean()


def grad_norm(term: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of d term / d params over all of ``params`` (unused params count 0); graph kept."""
    if not term.requires_grad or not params:
        return torch.zeros((), device=term.device)
    grads = torch.autograd.grad(term, list(params), retain_graph=True, allow_unused=True)
    squares = [g.float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=term.device)


class AdaptiveWeighter:
    """Inverse-gradient-norm weights, so each objective pulls the shared parameters about equally.

    Per micro-batch: n_j = ‖∇_θ term_j‖ (averaged across data-parallel ranks when torch.distributed is
    up).  :meth:`update` returns the weights of the tentative EMA E_j' = ema · E_j + (1 − ema) · n_j
    (E_j' = n_j on a term's first finite norm); :meth:`commit` makes it the EMA once the micro-batch is
    known to be finite on every rank, :meth:`discard` drops it for a skipped one.  A non-finite n_j
    never enters the EMA (the term keeps E_j).  Weight a_j = (1/E_j) / mean_{k: E_k>0}(1/E_k), so the
    weights of terms with a gradient average to 1; a term whose EMA is 0 (no gradient reaches θ) or
    not known yet gets weight 1.  Weights are detached; nothing here reads a value on the host.
    :meth:`state_dict` carries the EMA through checkpoints.
    """

    def __init__(self, ema: float):
        self.ema = ema
        self.norms: dict[str, torch.Tensor] = {}  # NaN = no finite norm seen yet
        self.pending: dict[str, torch.Tensor] | None = None

    def update(self, terms: dict[str, torch.Tensor], params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        trainable = [p for p in params if p.requires_grad]
        names = list(terms)
        norms = torch.stack([grad_norm(terms[n], trainable) for n in names]).detach()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(norms)
            norms = norms / dist.get_world_size()
        self.pending = dict(self.norms)
        for name, norm in zip(names, norms):
            prev = self.norms.get(name, torch.full_like(norm, math.nan))
            blended = torch.where(torch.isfinite(prev), self.ema * prev + (1.0 - self.ema) * norm, norm)
            self.pending[name] = torch.where(torch.isfinite(norm), blended, prev)
        return self.weights(names, self.pending)

    def commit(self) -> None:
        """Accept the pending update (the micro-batch was finite on every rank)."""
        if self.pending is not None:
            self.norms, self.pending = self.pending, None

    def discard(self) -> None:
        """Drop the pending update (the micro-batch is skipped on every rank)."""
        self.pending = None

    def state_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in self.norms.items()}

    def load_state_dict(self, state: dict[str, float], device: torch.device | str | None = None) -> None:
        self.norms = {name: torch.tensor(float(v), dtype=torch.float32, device=device) for name, v in state.items()}
        self.pending = None

    def weights(self, names: Sequence[str], norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weights of ``names`` from the committed EMA (or ``norms``); 1 for a name never updated."""
        norms = self.norms if norms is None else norms
        known = [n for n in names if n in norms]
        out = {n: torch.ones(()) for n in names if n not in norms}
        if known:
            ema = torch.stack([norms[n] for n in known])
            has_grad = torch.isfinite(ema) & (ema > 0)
            inv = torch.where(has_grad, 1.0 / ema.clamp_min(1e-30), torch.zeros_like(ema))
            mean_inv = inv.sum() / has_grad.sum().clamp_min(1)
            weights = torch.where(has_grad, inv / mean_inv.clamp_min(1e-30), torch.ones_like(ema))
            out.update(zip(known, weights.unbind()))
        return out


class NPTLoss(nn.Module):
    """All enabled NPT loss terms in one pass: ``total, components = loss(out, kd_weight, params, difficulty_keep)``.

    * ``direct``: Σ_i w_i MSE_i over the layers that carry a teacher target (w from
      ``loss.layer_weights``, summing to 1 over all NPT layers; a layer without target adds nothing).
      With ``loss.difficulty_mask`` each layer keeps only its ``difficulty_keep`` easiest tokens.
    * ``reg``: uniform mean over the NPT layers of mean v_a² + mean v_b² (not layer-weighted).
    * guidance terms: uniform mean over the NPT layers.
    * per-layer diagnostics keyed by ``LayerOutput.index``: ``layer/{i}/direct_mse`` (raw MSE: unscaled,
      unmasked) always; when the forward formed the vectors (log steps) also ``v_a_norm`` / ``v_b_norm``
      (mean L2 norm over tokens and k) and ``v_a_attn_sim`` (:func:`npt_ds.model.diagnostics.attn_alignment`).
    * adaptive weighting (``loss.adaptive_weighting``) needs ``params`` while training; in eval mode
      the stored weights are used and not updated.  Its weights are logged as ``weight/<term>``.
    """

    def __init__(self, cfg: LossConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.num_layers = num_layers
        self.layer_weights = parse_layer_weights(cfg.layer_weights, num_layers)
        self.adaptive = AdaptiveWeighter(cfg.adaptive_ema) if cfg.adaptive_weighting else None

    def extras(self, diagnostics: bool) -> NPExtras:
        """What the forward must add for these terms: the regulariser, and v_a itself for the guidance
        terms or for the logged per-layer ``diagnostics``."""
        guidance = any(getattr(self.cfg, field_name) > 0 for field_name in GUIDANCE.values())
        return NPExtras(vectors=guidance, reg=self.cfg.reg_lambda > 0, diagnostics=diagnostics,
                        state_target=self.cfg.direct_target == "state")

    def forward(self, out: NPTForwardOutput, kd_weight: float = 0.0, params: Sequence[torch.Tensor] | None = None,
                difficulty_keep: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        if len(out.layers) != self.num_layers:
            raise ValueError(f"NPTLoss was built for {self.num_layers} NPT layers but the forward returned "
                             f"{len(out.layers)}")
        comps: dict[str, torch.Tensor] = {}
        terms: dict[str, torch.Tensor] = {}
        coefs: dict[str, float] = {}
        for layer in out.layers:
            comps.update(_layer_metrics(layer))

        if cfg.direct_weight > 0:
            terms["direct"], coefs["direct"] = self._direct(out.layers, difficulty_keep), cfg.direct_weight
        if cfg.reg_lambda > 0:
            if any(layer.reg is None for layer in out.layers):
                raise ValueError("loss.reg_lambda > 0 needs each layer's regulariser; run the forward with "
                                 "extras=loss.extras(...)")
            reg = torch.stack([layer.reg for layer in out.layers]).mean()
            terms["reg"], coefs["reg"] = reg, cfg.reg_lambda
        if cfg.fidelity_weight > 0:
            terms["fidelity"], coefs["fidelity"] = fidelity_loss(out, cfg.fidelity_on), cfg.fidelity_weight
        if cfg.kd_weight > 0:
            if out.student_logits is None or out.teacher_logits is None:
                raise ValueError("loss.kd_weight > 0 needs student_logits and teacher_logits in the forward "
                                 "output; enable logits or set loss.kd_weight: 0")
            terms["kd"], comps["kd/kl"] = kd(out.student_logits, out.teacher_logits, cfg.kd_temperature)
            coefs["kd"] = kd_weight
        for name, field_name in GUIDANCE.items():
            weight = getattr(cfg, field_name)
            if weight > 0:
                per_layer = [self._guidance(name, layer) for layer in out.layers]
                terms[f"guidance/{name}"], coefs[f"guidance/{name}"] = torch.stack(per_layer).mean(), weight
        if not terms:
            raise ValueError("every loss term is disabled; set loss.direct_weight (or another weight) > 0")

        scales = self._adaptive_weights({n: terms[n] for n in ADAPTIVE_TERMS if n in terms}, params)
        total = sum(coefs[n] * (scales[n].to(t.device) * t if n in scales else t) for n, t in terms.items())
        comps["loss/total"] = total
        comps.update({f"loss/{n}": t for n, t in terms.items()})
        comps.update({f"weight/{n}": w for n, w in scales.items()})
        return total, {k: v.detach() for k, v in comps.items()}

    def _direct(self, layers: list[LayerOutput], keep: float) -> torch.Tensor:
        parts = []
        for w, layer in zip(self.layer_weights, layers):
            if layer.target is None:
                continue
            mask = None
            if self.cfg.difficulty_mask and keep < 1.0:
                mask = difficulty_token_weights(layer.student_out, layer.target, keep)
            parts.append(w * direct_mse(layer.student_out, layer.target, self.cfg.layerwise_scaling, mask))
        if not parts:
            raise ValueError("loss.direct_weight > 0 but no NPT layer carries a teacher target; compute the "
                             "targets or set loss.direct_weight: 0")
        return torch.stack(parts).sum()

    def _guidance(self, name: str, layer: LayerOutput) -> torch.Tensor:
        if layer.v_a is None:
            raise ValueError(f"loss guidance '{name}' needs v_a; run the forward with extras=loss.extras(...)")
        if name == "modulation":
            return modulation_guidance_loss(layer.v_a, layer.x, layer.attn, layer.h_in)
        if name == "info_bottleneck":
            return info_bottleneck_loss(layer.v_a)
        if name == "orthogonality":
            return orthogonality_loss(layer.v_a, layer.h_in, self.cfg.orthogonality_pcs)
        return projection_consistency_loss(layer.v_a, layer.attn)

    def finish_micro_batch(self, finite: bool) -> None:
        """After the all-ranks finite check: commit (finite) or drop (skipped) the adaptive-weight update."""
        if self.adaptive is not None:
            self.adaptive.commit() if finite else self.adaptive.discard()

    def _adaptive_weights(self, objectives: dict[str, torch.Tensor],
                          params: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if self.adaptive is None:
            return {}
        if not self.training:
            return self.adaptive.weights(list(objectives))
        if params is None:
            raise ValueError("loss.adaptive_weighting needs the trainable parameters: "
                             "call loss(out, ..., params=[...])")
        return self.adaptive.update(objectives, params)


@torch.no_grad()
def _layer_metrics(layer: LayerOutput) -> dict[str, torch.Tensor]:
    i = layer.index
    stats = layer.stats  # formed in the layer on log steps (diagnostics), else from kept vectors
    if stats is None and layer.v_a is not None:
        stats = vector_stats(layer.v_a, layer.v_b, layer.attn)
    metrics = {f"layer/{i}/{name}": value for name, value in (stats or {}).items()}
    if layer.target is not None:
        metrics[f"layer/{i}/direct_mse"] = direct_mse(layer.student_out, layer.target)
    return metrics
