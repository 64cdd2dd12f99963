"""Gradient-norm spikes, judged by whether the loss followed them (and saying whether they were clipped)."""
from __future__ import annotations

import statistics
from bisect import bisect_left, bisect_right
from collections import deque

import numpy as np

from ..parsing import Batch
from ..rolling import run_length, trailing
from .base import INFO, WARNING, AlertConfig, Detector, Hits, Restarts, fmt_value



class GradSpikeDetector(Detector):
    """A spike is judged once ``grad_spike_followup`` train losses followed it (or at :meth:`finish`)."""

    kind, severity = "grad_spike", WARNING

    def __init__(self, cfg: AlertConfig) -> None:
        super().__init__(cfg)
        self.recent = np.empty(0)  # the last grad_spike_window finite grad norms
        self.n_grads = 0  # finite grad norms seen
        self.active = False
        self.clip = cfg.grad_clip
        self.losses: deque[float] = deque(maxlen=20)  # the loss trend before a spike: their median
        self.pending: list = []  # [step, line_no, text, clipped, trend, losses after, at a stage change, batch index]
        self.stages = Restarts(cfg.stage_keys)
        self.since_stage = 10**9  # train lines since the last stage change

    def _judge(self, spike: list, complete: bool) -> tuple[str, str, int, int]:
        step, line_no, text, clipped, trend, after, staged, _ = spike
        clip = "clipped" if clipped else ("not clipped" if clipped is not None else "clip norm unknown")
        if staged:  # the loss moves by design there: nothing to compare with
            return INFO, f"{text}; {clip}; at a curriculum/sequential stage change", step, line_no
        if not after or trend is None:
            return WARNING, f"{text}; {clip}; loss follow-up unknown", step, line_no
        later = statistics.median(after)
        returned = later <= trend * (1 + self.cfg.grad_spike_loss_tolerance) if trend >= 0 else later <= trend
        follow = (f"loss back on trend ({fmt_value(later)} vs {fmt_value(trend)})" if returned
                  else f"loss followed it ({fmt_value(later)} vs trend {fmt_value(trend)})")
        if not complete:
            follow += f" after {len(after)} steps"
        return (INFO if returned else WARNING), f"{text}; {clip}; {follow}", step, line_no

    def scan(self, batch: Batch) -> Hits:
        """Every finite grad norm is first bounded by its trailing minimum (a spike over the median is
        one over the minimum too); only those candidates get the exact median and the state machine."""
        cfg = self.cfg
        train = batch.is_train.nonzero()[0]
        changed = np.zeros(len(batch), dtype=bool)
        changed[train] = self.stages.flags(batch, train.tolist())
        since = run_length(~changed[train], self.since_stage)  # train lines since a stage change, per train line
        loss_idx, loss_vals = batch.train_finite_columns(cfg.loss_key)
        gidx, gys, _, _ = batch.numeric(cfg.grad_key)
        gidx = np.arange(len(batch)) if gidx is None else gidx
        ok = np.isfinite(gys)
        gidx, gys = gidx[ok], gys[ok]
        cidx, cys, _, _ = batch.numeric("run/grad_clip")
        if len(cys):
            finite = np.isfinite(cys)
            cidx, cys = (np.arange(len(batch)) if cidx is None else cidx)[finite], cys[finite]
        w, first = cfg.grad_spike_window, len(self.recent)
        hist = np.concatenate([self.recent, gys])
        n_hist = np.minimum(self.n_grads + np.arange(len(gys)), w)  # grad norms known before each
        qual = n_hist >= cfg.grad_spike_min_history
        bound = trailing(np.minimum, hist, w, np.inf)[first:]
        cand = (qual & (gys > cfg.grad_spike_factor * bound)).nonzero()[0]
        active, prev = self.active, -1
        for j in cand.tolist():
            if j > 0 and qual[j - 1] and prev != j - 1:
                active = False  # a qualifying norm in between was no candidate, so no spike
            prev = j
            q = first + j
            median = float(np.median(hist[q - n_hist[j] : q]))
            g = float(gys[j])
            if not (median > 0 and g > cfg.grad_spike_factor * median):
                active = False
                continue
            if active:
                continue
            active = True
            i = int(gidx[j])
            c = int(np.searchsorted(cidx, i, "right")) if len(cys) else 0
            clip = float(cys[c - 1]) if c else self.clip
            prior = list(self.losses) + loss_vals[: bisect_left(loss_idx, i)]
            t = int(np.searchsorted(train, i, "right"))
            since_i = int(since[t - 1]) if t else self.since_stage
            self.pending.append([batch.steps[i], batch.line_nos[i],
                                 f"grad_norm {fmt_value(g)} = {g / median:.1f}x median {fmt_value(median)}",
                                 None if clip is None or clip <= 0 else g > clip,
                                 statistics.median(prior[-20:]) if prior else None, [],
                                 since_i < cfg.grad_spike_followup, i])
        if len(gys) and qual[-1] and prev != len(gys) - 1:
            active = False
        self.active = active
        hits = self._follow_up(batch, loss_idx, loss_vals, changed)
        if len(cys):
            self.clip = float(cys[-1])
        self.losses.extend(loss_vals)
        self.recent = hist[-w:] if w > 0 else np.empty(0)
        self.n_grads += len(gys)
        if len(train):
            self.since_stage = int(since[-1])
        return hits

    def _follow_up(self, batch: Batch, loss_idx: list, loss_vals: list, changed: np.ndarray) -> Hits:
        """Give each waiting spike the train losses after its line; judge those that have enough."""
        hits: Hits = []
        stage_lines = changed.nonzero()[0]
        waiting = []
        for spike in self.pending:
            origin = spike[7]
            start = bisect_right(loss_idx, origin)
            take = max(1, self.cfg.grad_spike_followup - len(spike[5]))
            spike[5] += loss_vals[start : start + take]
            done = len(spike[5]) >= self.cfg.grad_spike_followup and start + take <= len(loss_idx)
            end = loss_idx[start + take - 1] if done else len(batch)
            if len(stage_lines) and ((stage_lines > origin) & (stage_lines <= end)).any():
                spike[6] = True  # a stage started while the spike waited: the loss moves by design
            if done:
                sev, msg, step, line_no = self._judge(spike, True)
                hits.append((end, msg, sev, step, line_no))
            else:
                spike[7] = -1  # in the next batch every loss is after it
                waiting.append(spike)
        self.pending = waiting
        return hits

    def finish(self) -> list[tuple[str, str, int, int]]:
        """The spikes still waiting for their follow-up (end of a file)."""
        out = [self._judge(spike, False) for spike in self.pending]
        self.pending = []
        return out
