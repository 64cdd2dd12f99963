"""The training loop on a DeepSpeed engine: `train()` runs steps, `train_step()` is one optimizer step.

Per step: schedules decide LR, curriculum stage/mixing ratio and KD weight; each micro-batch runs
one fused forward through the engine; a non-finite loss on any rank skips that micro-batch on all
ranks (one 1-element all-reduce per micro-batch: the only per-step host sync; loss values are read
with `.item()` on log steps only).  Checkpoints, evaluation and the metric stream hang off the loop.
"""
from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch

from ..config import ConfigError, TrainConfig
from ..data.sources import PackedBatches, eval_batches, held_out_files
from ..metrics.comm import COUNTER
from ..metrics.rank_stats import RankStats
from ..metrics.tensorboard import require_tensorboard
from ..metrics.writer import MetricsWriter
from ..model import load_tokenizer
from ..model.quant import check_quantization_support
from ..parallel.ds_config import build_ds_config
from ..parallel.groups import (all_gather_objects, all_reduce_sum, any_rank_flags, barrier, flight_recorder_command, init_distributed,
                               release_shm_buffer)
from ..parallel.watchdog import Verdict, Watchdog
from ..parallel.resolve import resolve_hardware
from ..parallel.topology import detect_topology
from ..parallel.zero import coalesce_persistent_gather
from .checkpoint import (latest_step_dir, list_steps, load_checkpoint, read_meta, resolve_resume, resume_disagreement,
                         save_checkpoint)
from .elastic import keep_global_batch
from .evaluate import evaluate, layer_table, success_line
from .faults import (FaultHook, PreemptionFlag, communication_failure, dump_flight_recorder,
                     record_env_for_test)
from .build import build_train_module, default_curriculum, sequential_optim_config
from .module import StepControls
from .optim import build_param_groups, reset_optimizer_state, set_lr
from .schedules import difficulty_keep_at, kd_weight_at, lr_at, parse_curriculum


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left intact."""


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if cfg.logging.tensorboard:
            require_tensorboard()  # on every rank, before any collective: rank 0 alone failing would hang the others
        self.rank, self.world = init_distributed(cfg.distributed.timeout_s, cfg.logging.run_dir)
        self.watchdog = Watchdog(self.rank, self.world, cfg.distributed.heartbeat_timeout_s, on_abort=self.on_stall)
        self.preemption = PreemptionFlag()  # SIGTERM/SIGINT -> checkpoint at the next step boundary, exit 0
        self.fault = FaultHook.from_env(self.rank)  # test aid (NPT_DS_TEST_FAULT)
        record_env_for_test(cfg.logging.run_dir, self.rank)  # test aid (NPT_DS_TEST_RECORD_ENV)
        self.preempt_seen = False
        self.topology = detect_topology()  # the launcher's node layout: hpz's partition, `auto`'s choice
        cfg, self.start_notes = resolve_hardware(cfg, self.topology)  # 'auto' precision / frozen base
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume_target = self._resume_target(cfg)
        self.resharded_from = None
        if self.resume_target is not None:  # another world size: keep the global batch (before the engine exists)
            meta = read_meta(self.resume_target)
            cfg, note = keep_global_batch(cfg, meta, self.world)
            if int(meta.get("world_size", self.world)) != self.world:
                self.resharded_from = int(meta["world_size"])
            self.start_notes += [note] if note else []
        self.cfg = cfg
        self.curriculum = parse_curriculum(cfg.schedule.curriculum or default_curriculum(cfg), cfg.schedule.total_steps)
        self.ds_config = build_ds_config(cfg, self.world, self.topology.hpz_partition_size)
        check_quantization_support(cfg, self.ds_config["zero_optimization"].get("stage", 0))  # before any loading
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        self.module, self.layer_indices = build_train_module(cfg, self.ds_config)
        self.sequential = cfg.schedule.mode == "sequential"  # each layer gets its own LR group
        groups = build_param_groups(self.module, sequential_optim_config(cfg.optim, self.layer_indices)
                                    if self.sequential else cfg.optim)
        for group in groups:  # which NPT layer a group belongs to (sequential mode zeroes the others' LR)
            found = re.fullmatch(r"\*layers\.(\d+)\.np\.\*(/no_decay)?", group["name"])
            group["layer"] = int(found[1]) if found else None
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, model_parameters=groups, config=self.ds_config)
        if self.cfg.deepspeed.frozen_base == "resident":
            coalesce_persistent_gather(self.engine.optimizer)
        self.engine.train()  # load_base_model returns eval mode; bitsandbytes int8 computes differently there
        self.data = PackedBatches(cfg.data, self.tokenizer, self.rank, self.world, cfg.seed)
        self.eval_data = eval_batches(cfg.data, self.tokenizer, self.rank, self.world)
        if cfg.data.source == "files" and not cfg.data.eval_files:
            self.start_notes.append(f"data: {held_out_files(cfg.data)[0]} is held out of training for evaluation "
                                       "(data.eval_files names other held-out files)")
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank == 0, console=cfg.logging.console,
                                     wandb_cfg={"project": cfg.logging.wandb_project, "name": cfg.run_name,
                                                "config": cfg.to_dict()} if cfg.logging.wandb else None,
                                     tensorboard=cfg.logging.tensorboard)
        self.step = 0
        self.skipped = 0
        self.consecutive_bad = 0
        self.tokens_seen = 0
        self.log_buffer: dict[str, tuple[torch.Tensor, int]] = {}
        self.last_eval: dict = {}
        self.first_eval: dict | None = None
        self._poison_left = int(cfg.inject_nan.get("repeat", 1)) if cfg.inject_nan else 0
        self._window_start, self._window_tokens, self._window_wait = time.time(), 0, 0.0
        for note in self.start_notes:
            self.metrics.message(note)
        self.comm = COUNTER.install()
        self.rank_stats = RankStats(cfg, self.rank, self.world)
        self.reset_comm_window()
        self._resume()

    # ---------------------------------------------------------------- setup helpers
    def _resume_target(self, cfg: TrainConfig) -> Path | None:
        """The step dir to resume from, the same on every rank: each rank resolves its own (with
        checkpoint.node_local, from its own node's disk), then all compare; a disagreement or an error on any
        rank stops every rank with the same one line (exit 2) instead of a hang."""
        try:
            target = resolve_resume(self.ckpt_root, cfg.checkpoint.resume)
            if target is None and cfg.checkpoint.resume == "none" and list_steps(self.ckpt_root):
                raise ConfigError(f"logging.run_dir {str(self.run_dir)!r} already holds checkpoints; set "
                                  "checkpoint.resume: auto to continue it, or choose a new logging.run_dir")
            view = {"step": read_meta(target)["step"] if target else None}
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            view = {"error": str(exc), "kind": type(exc).__name__}
        views = all_gather_objects({**view, "host": socket.gethostname(), "rank": self.rank})
        problem = resume_disagreement(views)
        if problem:
            kind = next((v["kind"] for v in views if "error" in v), "ConfigError")
            raise {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(kind, ConfigError)(problem)
        return target

    def _resume(self) -> None:
        target = self.resume_target
        if target is None:
            return
        meta = load_checkpoint(self.engine, target, self.rank, self.world)
        self.step, self.skipped = meta["step"], meta["skipped_steps"]
        if self.module.loss_fn.adaptive is not None and "adaptive_norms" in meta:
            self.module.loss_fn.adaptive.load_state_dict(meta["adaptive_norms"], self.engine.device)
        self.tokens_seen = meta.get("tokens_seen", 0)
        if "cursor" not in meta["data"]:
            raise ConfigError(f"checkpoint.resume: {target} has no global data cursor (written by an older npt-ds); "
                              "start a new logging.run_dir")
        self.data.load_state_dict(meta["data"])
        self.metrics.message(f"resumed from {target} at step {self.step}")

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        cfg = self.cfg
        total = cfg.schedule.total_steps
        self.watchdog.start()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        self.metrics.log({"step": self.step, "event": "start", "run/name": cfg.run_name, "run/total_steps": total,
                          "run/world_size": self.world, "run/npt_layers": ",".join(map(str, self.layer_indices)),
                          "run/precision": cfg.deepspeed.precision, "run/grad_clip": cfg.optim.grad_clip,
                          "run/frozen_base": cfg.deepspeed.frozen_base, "run/launcher": self.topology.launcher,
                          "run/nodes": self.topology.nodes, "run/ranks_per_node": self.topology.per_node,
                          # from the module: ZeRO-3 keeps its optimizer's param groups empty between steps
                          "run/trainable_params": sum(getattr(p, "ds_numel", p.numel())
                                                      for p in self.module.parameters() if p.requires_grad)})
        restart = int(os.environ.get("NPT_DS_RESTART", "0") or 0)
        if restart:  # launch/common.sh relaunched the job after a failure (MAX_RESTARTS)
            self.metrics.log({"step": self.step, "event": "restart", "restart": restart})
        if self.resharded_from is not None:  # resumed from a checkpoint of another world size
            self.metrics.log({"step": self.step, "event": "resharded", "from_world_size": self.resharded_from,
                              "to_world_size": self.world, "grad_accum": cfg.optim.grad_accum,
                              "path": str(self.resume_target)})
        if self.step == 0:
            self.run_eval()
        start_step, t0 = self.step, time.time()
        self._window_start, self._window_tokens, self._window_wait = t0, 0, self.data.wait_s
        stop = min(total, cfg.schedule.stop_at) if cfg.schedule.stop_at > 0 else total
        while self.step < stop:
            self.train_step()
            self.rank_stats.step_done()
            self.step += 1
            self._steps_since_mark += 1
            if self.logs_after(self.step):
                self.log_train(start_step, t0)
            if self.fault is not None:
                self.fault.after_step(self.step, self.run_dir)
            if self.preempt_seen and self.step < total:  # every rank saw it in this step's flag all-reduce
                path = self.save()
                self.metrics.log({"step": self.step, "event": "preempted", "signal": self.preemption.signal_name
                                  or "another rank's", "path": str(path), "skipped_steps": self.skipped})
                self.metrics.message(f"preempted at step {self.step}: checkpoint {path}; `checkpoint.resume: auto` "
                                     "continues from it")
                return self.last_eval
            if cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0 and self.step < total:
                self.run_eval()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < stop:
                self.save()
        if self.step < total:  # stopped early on purpose: checkpoint so `resume: auto` continues here
            self.save()
            self.metrics.log({"step": self.step, "event": "stop", "skipped_steps": self.skipped})
            return self.last_eval
        self.run_eval()
        if cfg.checkpoint.save_final:
            self.save()
        pause, phase = self.watchdog.longest_pause
        self.metrics.log({"step": self.step, "event": "end", "skipped_steps": self.skipped,
                          "watchdog/longest_pause_s": round(pause, 3), "watchdog/longest_pause_phase": phase})
        self.summary()
        return self.last_eval

    def summary(self) -> None:
        first, last = self.first_eval, self.last_eval
        lines = [f"done: {self.step} steps, {self.skipped} skipped, {self.tokens_seen:,} tokens"]
        if first and last:
            lines.append(f"held-out perplexity  base {last['eval/ppl_base']:.3f} | NPT step {first['step']}: "
                         f"{first['eval/ppl_npt']:.3f} -> step {last['step']}: {last['eval/ppl_npt']:.3f}")
            lines.append(success_line(last))
            lines.append(f"held-out per-layer fidelity, step {first['step']} -> step {last['step']}:")
            lines += ["  " + line for line in layer_table(first, last)]
        lines.append(f"metric stream: {self.metrics.path}   (watch: npt-monitor {self.run_dir})")
        self.metrics.message("\n".join(lines))

    def controls(self, step: int) -> StepControls:
        cfg = self.cfg
        stage, ratio = self.curriculum.stage_at(step)
        if cfg.schedule.mode == "single_layer":
            ratio = 0.0
        kd = kd_weight_at(step, cfg.schedule.total_steps, cfg.loss.kd_weight, cfg.loss.kd_warmup_start,
                          cfg.loss.kd_warmup_frac) if cfg.loss.kd_weight > 0 else 0.0
        keep = difficulty_keep_at(step, cfg.schedule.total_steps) if cfg.loss.difficulty_mask else 1.0
        needs_logits = cfg.loss.kd_weight > 0 or (cfg.loss.fidelity_weight > 0 and cfg.loss.fidelity_on != "hidden")
        # the student's final state feeds fidelity / KD only; up to the last NPT layer fused_forward runs the
        # student stream by itself when the mixing ratio needs it
        student_stream = cfg.loss.fidelity_weight > 0 or cfg.loss.kd_weight > 0
        inject = cfg.inject_nan
        poison = bool(inject) and step == inject.get("step", 0) and self.rank == inject.get("rank", 0) \
            and self._poison_left > 0
        return StepControls(stage=stage, mixing_ratio=ratio, kd_weight=kd, difficulty_keep=keep, student_stream=student_stream,
                            want_logits=needs_logits, poison=poison, active_layers=self.active_layers(step),
                            diagnostics=self.logs_after(step + 1))

    def logs_after(self, steps_done: int) -> bool:
        """Whether a train line is written once `steps_done` steps have run (its step forms the diagnostics)."""
        return steps_done % self.cfg.logging.log_every == 0 or steps_done == self.cfg.schedule.total_steps

    def active_layers(self, step: int) -> tuple[int, ...] | None:
        """Sequential mode: the layer (or group of ``schedule.sequential_group`` layers, bottom-up) trained at
        `step`; earlier ones are carried.  Else None = all."""
        if not self.sequential:
            return None
        group = self.cfg.schedule.sequential_group
        k = self.layer_stage(step)[0]
        return tuple(self.layer_indices[k * group:(k + 1) * group])

    def layer_stage(self, step: int) -> tuple[int, int, int]:
        """Sequential mode: (position of the stage at `step`, its first step, its number of steps).

        Stage k (layer k, or group k of ``schedule.sequential_group`` layers) trains for steps [k·P, (k+1)·P)
        with P = schedule.sequential_steps_per_layer (default total / stages); the last stage also takes
        whatever steps remain.
        """
        n, total = len(self.layer_indices) // self.cfg.schedule.sequential_group, self.cfg.schedule.total_steps
        per_stage = self.cfg.schedule.sequential_steps_per_layer or math.ceil(total / n)
        k = min(step // per_stage, n - 1)
        start = k * per_stage
        return k, start, (per_stage if k < n - 1 else max(total - start, 1))

    def lr_at(self, step: int) -> float:
        """The base LR at `step`: warm-up + cosine over the run, or over each layer's stage in sequential mode
        (every layer gets the whole schedule, warm-up included, not a slice of a global decay)."""
        sched = self.cfg.schedule
        if self.sequential:
            _, start, length = self.layer_stage(step)
            return lr_at(step - start, self.cfg.optim.lr, min(sched.warmup_steps, length), length, sched.min_lr_ratio)
        return lr_at(step, self.cfg.optim.lr, sched.warmup_steps, sched.total_steps, sched.min_lr_ratio)

    def train_step(self) -> None:
        """One optimizer step: grad_accum good micro-batches; non-finite ones are skipped on all ranks."""
        cfg = self.cfg
        controls = self.controls(self.step)
        lr = self.lr_at(self.step)
        set_lr(self.engine.optimizer, lr)
        if controls.active_layers is not None:  # freeze every other layer exactly: LR 0 leaves Adam's update at 0
            groups = self.engine.optimizer.param_groups
            for group in groups:
                if group.get("layer") is not None and group["layer"] not in controls.active_layers:
                    group["lr"] = 0.0
            if self.step == self.layer_stage(self.step)[1]:  # a layer starts: fresh Adam moments and step count
                reset_optimizer_state(self.engine.optimizer, [i for i, g in enumerate(groups)
                                                              if g.get("layer") in controls.active_layers])
        self._lr, self._controls = lr, controls
        good = 0
        mark = self.watchdog.progress
        while good < cfg.optim.grad_accum:
            mark(self.step, "data")
            ids = next(self.data).to(self.engine.device)
            mark(self.step, "forward")
            loss, comps = self.engine(ids, controls)
            mark(self.step, "flags")
            # the one host sync of a non-log step: a non-finite loss on any rank, a preemption signal on any rank
            nonfinite = (~torch.isfinite(loss.detach())).any().float()
            bad, preempted = any_rank_flags(torch.stack([nonfinite, nonfinite.new_full((), float(self.preemption.set))]))
            finite = not bad
            self.preempt_seen |= preempted
            self.module.loss_fn.finish_micro_batch(finite)
            if not finite:
                if controls.poison:
                    self._poison_left -= 1
                    controls.poison = self._poison_left > 0
                self.on_bad_batch(comps)
                continue
            mark(self.step, "backward")
            self.engine.backward(loss)
            mark(self.step, "optimizer")
            self.engine.step()
            self.consecutive_bad = 0
            good += 1
            self.tokens_seen += ids.numel() * self.world
            self._window_tokens += ids.numel() * self.world
            for k, v in comps.items():  # (sum, count): diagnostics exist on log steps only
                total, count = self.log_buffer.get(k, (0.0, 0))
                self.log_buffer[k] = (total + v, count + 1)

    def on_bad_batch(self, comps: dict) -> None:
        self.skipped += 1
        self.consecutive_bad += 1
        loss = comps.get("loss/total")
        self.metrics.log({"step": self.step, "event": "nan_step", "skipped_steps": self.skipped,
                          "loss/total": float(loss) if loss is not None else float("nan")})
        self.metrics.message(f"step {self.step}: non-finite loss on some rank; micro-batch skipped on all ranks "
                             f"({self.skipped} skipped so far)")
        limit = self.cfg.logging.max_consecutive_nan
        if self.consecutive_bad >= limit:
            latest = latest_step_dir(self.ckpt_root)
            last = f"last good checkpoint: {latest}" if latest else "no checkpoint was saved"
            raise TrainingDiverged(f"{limit} consecutive non-finite micro-batches at step {self.step}; stopping "
                                   f"({last}). Lower optim.lr or check the data.")

    # ---------------------------------------------------------------- logging, eval, checkpoints
    def log_train(self, start_step: int, t0: float) -> None:
        self.watchdog.progress(self.step, "log")
        cfg = self.cfg
        now = time.time()
        tps = self._window_tokens / max(now - self._window_start, 1e-9)
        wait = self.data.wait_s - self._window_wait
        data_wait = wait / max(now - self._window_start, 1e-9)
        self._window_start, self._window_tokens, self._window_wait = now, 0, self.data.wait_s
        per_step = (now - t0) / max(self.step - start_step, 1)
        comm = self.comm_per_step()
        eta = per_step * (cfg.schedule.total_steps - self.step)
        record = {"step": self.step, "event": "train", "lr": self._lr,
                  "kd/weight": self._controls.kd_weight, "curriculum/stage": self._controls.stage,
                  "curriculum/mixing_ratio": self._controls.mixing_ratio, "tokens_per_s": round(tps, 2),
                  "eta_s": round(eta, 1), "skipped_steps": self.skipped, "tokens": self.tokens_seen,
                  "time/data_wait_frac": round(data_wait, 5), **comm}
        if self._controls.active_layers is not None:
            record["sequential/layer"] = self._controls.active_layers[0]
        if cfg.loss.difficulty_mask:
            record["difficulty/keep"] = self._controls.difficulty_keep
        record.update(self.mean_over_ranks(self.log_buffer))  # the host sync of a log step
        record.update(self.rank_stats.record(tps))  # per-rank timing and memory: one all-gather
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.log_buffer = {}
        self.metrics.log(record)
        mfu = f"MFU {record['perf/mfu']:.1%} " if "perf/mfu" in record else ""
        self.metrics.progress(self.step, cfg.schedule.total_steps, record.get("loss/total", math.nan), tps, eta,
                              f"{mfu}[{self._controls.stage}]")

    @staticmethod
    def mean_over_ranks(buffer: dict[str, tuple[torch.Tensor, int]]) -> dict[str, float]:
        """Each logged quantity's mean over all ranks' micro-batches (one all-reduce on log steps), so the stream
        does not depend on the world size: 2 ranks x 1 micro-batch log what 1 rank x 2 micro-batches does."""
        names = sorted(buffer)
        sums = all_reduce_sum([float(buffer[k][0]) for k in names] + [float(buffer[k][1]) for k in names])
        return {k: sums[i] / max(sums[len(names) + i], 1) for i, k in enumerate(names)}

    def reset_comm_window(self) -> None:
        """Start counting collective bytes afresh (after set-up, an eval or a save: not a training step's)."""
        self._comm_mark, self._steps_since_mark = self.comm.totals(), 0
        self.rank_stats.mark()

    def comm_per_step(self) -> dict[str, float]:
        """This rank's collective bytes (GB) and calls per optimizer step since the window started; starts a new one.

        Only training steps run collectives inside a window (evals and saves start a new one)."""
        now, steps = self.comm.totals(), max(self._steps_since_mark, 1)
        per_step = {}
        for kind in ("gather", "reduce"):
            per_step[f"comm/{kind}_gb_per_step"] = round((now[kind] - self._comm_mark[kind]) / steps / 1e9, 9)
            per_step[f"comm/{kind}_calls_per_step"] = round((now[f"{kind}_calls"] - self._comm_mark[f"{kind}_calls"])
                                                            / steps, 3)
        self._comm_mark, self._steps_since_mark = now, 0  # (the rank-stats window ends in log_train)
        return per_step

    def run_eval(self) -> dict:
        self.watchdog.progress(self.step, "eval")
        self.engine.eval()
        result = evaluate(self.engine.module.model, self.eval_data, self.engine.device)
        self.engine.train()
        self.last_eval = {"step": self.step, **result}
        if self.first_eval is None:
            self.first_eval = self.last_eval
        self.reset_comm_window()
        self.metrics.log({"event": "eval", **self.last_eval})
        self.metrics.message(f"eval @ step {self.step}: ppl base {result['eval/ppl_base']:.3f}  "
                             f"npt {result['eval/ppl_npt']:.3f}  fidelity mse {result['eval/fidelity_mse']:.4g}")
        return result

    def save(self) -> Path:
        meta = {"step": self.step, "skipped_steps": self.skipped, "tokens_seen": self.tokens_seen,
                "data": self.data.state_dict(), "config": self.cfg.to_dict(), "world_size": self.world}
        if self.module.loss_fn.adaptive is not None:
            meta["adaptive_norms"] = self.module.loss_fn.adaptive.state_dict()
        self.watchdog.progress(self.step, "checkpoint")
        hook = None if self.fault is None else (lambda: self.fault.in_save(self.step, self.run_dir))
        target = save_checkpoint(self.engine, self.ckpt_root, self.step, meta, self.rank, self.cfg.checkpoint.keep_last,
                                 before_publish=hook, node_local=self.cfg.checkpoint.node_local)
        self.reset_comm_window()
        self.metrics.log({"step": self.step, "event": "checkpoint", "path": str(target)})
        return target

    # ---------------------------------------------------------------- failures: a lost or stalled peer
    def lost_peers(self, exc: BaseException) -> list[int] | None:
        """Whether `exc` means that peers are gone: None when it does not (a local error, raised as such: every
        peer still sends heartbeats), else the ranks gone ([] when they cannot be told, the watchdog being off)."""
        if self.world < 2 or not communication_failure(exc):
            return None
        gone = self.watchdog.lost_peers()
        if gone == []:
            return None
        return gone or []

    def abort(self, exc: BaseException, missing: list[int]) -> str:
        """A peer is gone: log the `abort` event (the lowest live rank writes it) and say so in one line."""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.write_abort({"step": self.step, "event": "abort", "reason": "lost", "missing_ranks": missing or None,
                          "error": error}, missing)
        who = f"rank {', '.join(map(str, missing))}" if missing else "a peer"
        return f"lost {who} at step {self.step} ({type(exc).__name__}); rank {self.rank} stops. {self.relaunch_hint()}"

    def on_stall(self, verdict: Verdict) -> None:
        """The watchdog named stalled ranks (from its thread; the loop may be stuck): report, then it exits 4."""
        self.write_abort({"step": self.step, "event": "abort", "reason": verdict.reason,
                          "missing_ranks": verdict.stalled, "rank_steps": {str(r): s for r, s in verdict.steps.items()},
                          "rank_phases": {str(r): p for r, p in verdict.phases.items()},
                          "error": verdict.describe()}, verdict.stalled)
        print(f"\nnpt-ds train: {verdict.describe()}; rank {self.rank} (step {self.step}, "
              f"{self.watchdog.phase}) stops with exit 4. {self.relaunch_hint()}", file=sys.stderr, flush=True)

    def write_abort(self, record: dict, missing: list[int]) -> None:
        """The lowest live rank appends the abort event (rank 0 through its writer; another rank opens the stream
        for this one line), closes the stream and frees its shm buffer; on CUDA each rank dumps its flight record."""
        if self.rank == min((r for r in range(self.world) if r not in missing), default=self.rank):
            writer = self.metrics if self.rank == 0 else MetricsWriter(self.run_dir, console=False)
            writer.log(record)
            writer.close()
        if torch.cuda.is_available() and dump_flight_recorder(self.run_dir, self.rank):
            print(f"npt-ds train: NCCL flight records in {self.run_dir / 'nccl-trace'}; analyse them with: "
                  f"{flight_recorder_command(self.run_dir)}", file=sys.stderr, flush=True)
        self.metrics.close()
        release_shm_buffer(self.rank)

    def relaunch_hint(self) -> str:
        latest = latest_step_dir(self.ckpt_root)
        resume = latest.name if latest else "the start (no checkpoint yet)"
        return f"Relaunch (MAX_RESTARTS=N in launch/*.sh, MAX_REQUEUES=N in launch/train_slurm.sbatch) to resume from {resume}"

    def close(self) -> None:
        self.preemption.restore()
        self.data.close()
        self.metrics.close()
        barrier()
        self.watchdog.stop()
