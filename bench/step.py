"""Step benchmark: one full NPT training step, fused vs two-pass vs a plain forward+backward.

Variants (same model object, same batch, interleaved in one process):

* ``fused``          -- NPTTrainModule(model, NPTLoss) forward + backward + torch.optim.Adam step on the NP
                        params (single-layer mode, no DeepSpeed): what the trainer runs.
* ``two_pass``       -- the reference of DESIGN §3 and the issue ("runs the whole model twice"): a teacher
                        forward with hooks capturing every NPT layer's input and output, then a student
                        forward through every layer up to the last NPT layer; same NPTLoss, backward, Adam.
* ``two_pass_reuse`` -- a stronger, supplementary two-pass: its student pass skips the frozen layers and
                        only recomputes each NPT layer's attention on the captured input.  The fused step
                        can beat it only by that attention (FLOP ratio in the output).
* ``plain``          -- the base model (NPT layers in teacher mode = the unconverted model), every weight
                        frozen, embedding output requires grad, LM cross-entropy, backward to the embeddings:
                        the physical reference of a forward+backward through the same frozen weights.
* ``teacher_fwd``    -- the teacher forward alone (decoder stack up to the last NPT layer, no_grad): the
                        floor under any step that needs every NPT layer's teacher target.
                        fused − teacher_fwd = the student's cost; two_pass_reuse − fused = the recomputed
                        attention (+ hook overhead).
* ``mixed``          -- a multi-layer step in the mixed stage (ρ = 0.5) without fidelity / KD: the student
                        stream runs only as far as the last NPT layer.
* ``mixed_to_end``   -- the same step as it used to run: both streams through every layer to the final norm,
                        which no loss read.  ``teacher_stage_to_end`` likewise for ρ = 0, whose step now is
                        exactly ``fused`` (no student stream at all).
* ``kd_fidelity``    -- fidelity on the final hidden state + KD on the logits (both streams to the end);
  ``kd_fidelity_adaptive`` the same with adaptive loss weighting: three extra retained backward passes
                        (``autograd.grad`` of direct, fidelity and KD w.r.t. the NP params) per micro-batch.
"""
from __future__ import annotations

import dataclasses

import torch

from npt_ds.config import LossConfig
from npt_ds.train.losses import NPTLoss
from npt_ds.model import np_named_parameters, npt_layers, set_mode
from npt_ds.train.module import NPTTrainModule, StepControls

from .common import (alloc_peak_mb, count_flops, format_table, interleaved, ratio, run_probe, stats,
                     target)
from .models import build_model, make_batch
from .two_pass import two_pass_forward, two_pass_reuse_forward

VARIANTS = ("fused", "two_pass", "two_pass_reuse", "plain", "teacher_fwd", "mixed", "mixed_to_end",
            "teacher_stage_to_end", "kd_fidelity", "kd_fidelity_adaptive")
KD_FIDELITY = LossConfig(fidelity_weight=0.5, kd_weight=1.0)
KD_CONTROLS = StepControls(kd_weight=1.0, student_stream=True, want_logits=True, diagnostics=False)
MODULE_STEPS = {  # variant -> (loss config, controls) of an NPTTrainModule step
    "fused": (LossConfig(), StepControls(diagnostics=False)),  # a non-log training step
    "mixed": (LossConfig(), StepControls(mixing_ratio=0.5, diagnostics=False)),
    "mixed_to_end": (LossConfig(), StepControls(mixing_ratio=0.5, student_stream=True, diagnostics=False)),
    "teacher_stage_to_end": (LossConfig(), StepControls(mixing_ratio=0.0, student_stream=True, diagnostics=False)),
    "kd_fidelity": (KD_FIDELITY, KD_CONTROLS),
    "kd_fidelity_adaptive": (dataclasses.replace(KD_FIDELITY, adaptive_weighting=True), KD_CONTROLS),
}

class StepBench:
    """Holds the model, batch, loss and one optimizer per variant; `steps[name]()` runs one step."""

    def __init__(self, opts, model=None, ids=None):
        self.opts = opts
        self.model = model if model is not None else build_model(opts)
        self.ids = ids if ids is not None else make_batch(opts, self.model)
        self.n_layers = len(npt_layers(self.model))
        self.loss_fn = NPTLoss(LossConfig(), self.n_layers)
        self.module = NPTTrainModule(self.model, self.loss_fn)
        self.params = [p for _, p in np_named_parameters(self.model)]
        self.opt = {name: torch.optim.Adam(self.params, lr=1e-4) for name in (*MODULE_STEPS, "two_pass", "two_pass_reuse")}
        self.steps = {"two_pass_reuse": self.two_pass_reuse_step, "two_pass": self.two_pass_step,
                      "plain": self.plain_step, "teacher_fwd": self.teacher_forward}
        self.modules = {}
        for name, (loss_cfg, _) in MODULE_STEPS.items():
            self.modules[name] = self.module if loss_cfg == LossConfig() else \
                NPTTrainModule(self.model, NPTLoss(loss_cfg, self.n_layers))
            self.steps[name] = lambda name=name: self._train(name, lambda: self.module_loss(name))

    # -- losses (no optimizer step): used by the equivalence checks
    def module_loss(self, variant: str) -> torch.Tensor:
        module = self.modules[variant]
        loss, _ = module(self.ids, MODULE_STEPS[variant][1])
        module.loss_fn.finish_micro_batch(finite=True)
        return loss

    def fused_loss(self) -> torch.Tensor:
        return self.module_loss("fused")

    def two_pass_reuse_loss(self) -> torch.Tensor:
        loss, _ = self.loss_fn(two_pass_reuse_forward(self.model, self.ids))
        return loss

    def two_pass_loss(self) -> torch.Tensor:
        loss, _ = self.loss_fn(two_pass_forward(self.model, self.ids))
        return loss

    # -- full training steps
    def _train(self, name: str, loss_of) -> None:
        opt = self.opt[name]
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        opt.step()

    def two_pass_reuse_step(self) -> None:
        self._train("two_pass_reuse", self.two_pass_reuse_loss)

    def two_pass_step(self) -> None:
        self._train("two_pass", self.two_pass_loss)

    def plain_step(self) -> None:
        model = self.model
        set_mode(model, "teacher")
        try:
            with torch.no_grad():
                embeds = model.model.embed_tokens(self.ids)
            embeds.requires_grad_(True)
            out = model(inputs_embeds=embeds, labels=self.ids, use_cache=False)
            out.loss.backward()
        finally:
            set_mode(model, "student")

    def teacher_forward(self) -> None:
        """The teacher forward up to the last NPT layer (what the fused step cannot avoid)."""
        cfg = self.model.config
        n_layers = cfg.num_hidden_layers
        cfg.num_hidden_layers = max(layer.layer_idx for layer in npt_layers(self.model)) + 1  # HF slices layers by it
        set_mode(self.model, "teacher")
        try:
            with torch.no_grad():
                self.model.model(input_ids=self.ids, use_cache=False)
        finally:
            set_mode(self.model, "student")
            cfg.num_hidden_layers = n_layers

    def check_equivalence(self) -> dict:
        """Loss and NP-gradient agreement of fused vs two-pass on this batch and these params."""
        res = {}
        ref_loss, ref_grads = self._loss_and_grads(self.fused_loss)
        for name, fn in (("two_pass", self.two_pass_loss), ("two_pass_reuse", self.two_pass_reuse_loss)):
            loss, grads = self._loss_and_grads(fn)
            res[name] = {"loss_fused": ref_loss, "loss": loss, "abs_diff": abs(loss - ref_loss),
                         "rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30),
                         "grad_max_rel_diff": max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                                                  for a, b in zip(ref_grads, grads))}
        return res

    def _loss_and_grads(self, fn) -> tuple[float, list[torch.Tensor]]:
        for p in self.params:
            p.grad = None
        loss = fn()
        loss.backward()
        grads = [p.grad.detach().clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return float(loss.detach()), grads


def run_step(opts) -> dict:
    bench = StepBench(opts)
    tokens = bench.ids.numel()
    variants = [v for v in VARIANTS if v in opts.step_variants]
    result: dict = {"config": {"shape": opts.shape, "npt_layers": [l.layer_idx for l in npt_layers(bench.model)],
                               "seq": opts.seq, "batch": opts.batch, "tokens_per_step": tokens,
                               "dtype": opts.dtype, "device": opts.device, "repeats": opts.step_repeats,
                               "best_of": opts.step_best_of,
                               "mode": "single_layer", "optimizer": "torch.optim.Adam (NP params)",
                               "two_pass_teacher": "model.model (decoder stack, no LM head), use_cache=False"},
                    "equivalence": bench.check_equivalence(), "rows": [], "ratios": {}}
    times = interleaved({v: bench.steps[v] for v in variants}, opts.step_repeats, inner=1, warmup=1,
                        device=opts.device, best_of=opts.step_best_of)
    flops = {v: count_flops(bench.steps[v]) for v in variants}
    for v in variants:
        s = stats(times[v])
        row = {"variant": v, "s_median": s["median_s"], "s_min": s["min_s"], "tokens_per_s": tokens / s["median_s"],
               "gflop": flops[v] / 1e9, "gflops_per_s": flops[v] / 1e9 / s["median_s"], "samples_s": times[v]}
        if opts.peak_tflops:
            row["mfu"] = flops[v] / s["median_s"] / (opts.peak_tflops * 1e12)
        if opts.memory:
            row["alloc_peak_mb"] = alloc_peak_mb(bench.steps[v], opts.device)
        result["rows"].append(row)
    for a, b in (("fused", "two_pass"), ("fused", "two_pass_reuse"), ("fused", "plain"), ("two_pass", "plain"),
                 ("teacher_fwd", "fused"), ("mixed", "mixed_to_end"), ("fused", "teacher_stage_to_end"),
                 ("kd_fidelity_adaptive", "kd_fidelity")):
        if a in times and b in times:
            result["ratios"][f"{a}/{b}"] = ratio(times, a, b)
            result["ratios"][f"{a}/{b}"]["flops"] = flops[a] / flops[b]
    if opts.memory and opts.rss_probe and opts.device == "cpu":
        for row in result["rows"]:
            if row["variant"] in ("fused", "two_pass", "plain"):
                row.update(run_probe(["step", row["variant"], *probe_args(opts)]))
    if "teacher_fwd" in times and "fused" in times and "two_pass_reuse" in times:
        med = {v: stats(times[v])["median_s"] for v in ("teacher_fwd", "fused", "two_pass_reuse")}
        student = med["fused"] - med["teacher_fwd"]
        result["breakdown_s"] = {"teacher_forward": med["teacher_fwd"], "student_fwd_bwd_adam": student,
                                 "two_pass_reuse_extra": med["two_pass_reuse"] - med["fused"],
                                 "max_fused_over_two_pass_reuse_if_student_were_free":
                                     med["two_pass_reuse"] / med["teacher_fwd"]}
    if opts.profile:
        result["profile"] = {v: profile_top_ops(bench.steps[v]) for v in ("fused", "two_pass", "two_pass_reuse") if v in variants}
    result["targets"] = step_targets(result["ratios"])
    return result


def profile_top_ops(fn, rows: int = 14, tries: int = 2) -> list[dict]:
    """torch.profiler of one call: self CPU time per (op, input shapes), largest first.

    Best of `tries` profiles (the one with the least total time: load bursts distort single runs).
    """
    from torch.profiler import ProfilerActivity, profile

    best = None
    for _ in range(tries):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        avgs = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in avgs)
        if best is None or total < best[0]:
            best = (total, avgs)
    total, avgs = best
    return [{"op": e.key, "shapes": str(e.input_shapes)[:80], "calls": e.count,
             "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / max(total, 1), 3)} for e in avgs[:rows]]


def step_targets(ratios: dict) -> dict:
    ab = ratios.get("fused/two_pass")
    ac = ratios.get("fused/plain")
    return {
        "fused_vs_two_pass_throughput": target(1 / ab["paired_median"] if ab else None, 1.4, ">=",
                                               "fused tokens/s ÷ two-pass (whole model twice) tokens/s"),
        "fused_vs_plain_cost": target(ac["paired_median"] if ac else None, 1.6, "<=",
                                      "fused step time ÷ plain forward+backward time"),
    }


def probe_args(opts) -> list[str]:
    args = ["--shape", opts.shape, "--seq", str(opts.seq), "--batch", str(opts.batch), "--dtype", opts.dtype,
            "--threads", str(opts.threads)]
    if opts.num_layers:
        args += ["--num-layers", str(opts.num_layers)]
    if opts.npt_layers:
        args += ["--npt-layers", opts.npt_layers]
    return args


def print_step(res: dict) -> str:
    cols = [("variant", "variant", ""), ("s/step (median)", "s_median", ".3f"), ("s (min)", "s_min", ".3f"),
            ("tokens/s", "tokens_per_s", ",.1f"), ("GFLOP/step", "gflop", ".1f"), ("GFLOP/s", "gflops_per_s", ".1f"),
            ("alloc peak MB", "alloc_peak_mb", ".0f"), ("peak RSS MB", "peak_rss_mb", ".0f"),
            ("RSS delta MB", "rss_delta_mb", ".0f")]
    if any("mfu" in r for r in res["rows"]):
        cols.append(("MFU", "mfu", ".3f"))
    c = res["config"]
    lines = [format_table(res["rows"], cols, f"== step: {c['shape']}, NPT layers {c['npt_layers'][0]}-"
                                              f"{c['npt_layers'][-1]}, seq {c['seq']} x {c['batch']}, "
                                              f"{c['dtype']} on {c['device']}")]
    for name, r in res["ratios"].items():
        lines.append(f"time {name}: paired {r['paired_median']:.3f}, medians {r['of_medians']:.3f}, "
                     f"minima {r['of_minima']:.3f}, FLOPs {r['flops']:.3f}")
    if "breakdown_s" in res:
        b = res["breakdown_s"]
        lines.append(f"breakdown (medians): teacher forward {b['teacher_forward']:.3f} s, student fwd+bwd+Adam "
                     f"{b['student_fwd_bwd_adam']:.3f} s, reuse two-pass extra {b['two_pass_reuse_extra']:.3f} s; "
                     f"two_pass_reuse/teacher_fwd = {b['max_fused_over_two_pass_reuse_if_student_were_free']:.2f} "
                     "(the fused/two_pass_reuse speed-up if the student cost nothing)")
    for v, ops in res.get("profile", {}).items():
        lines.append(f"profile {v}: " + "; ".join(f"{o['op']} {o['shapes']} x{o['calls']} {o['self_ms']} ms"
                                                   for o in ops[:8]))
    for name, e in res["equivalence"].items():
        lines.append(f"equivalence fused vs {name}: loss {e['loss_fused']:.6g} vs {e['loss']:.6g} "
                     f"(rel {e['rel_diff']:.1e}), grad max rel diff {e['grad_max_rel_diff']:.1e}")
    return "\n".join(lines)
