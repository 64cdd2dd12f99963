"""`npt-ds inject-eval`: does injecting a fact's context make the model answer it, and at what cost?

For each fact and alpha (each injection starts from the loaded model): the answer's log-probability (sum over
its tokens) and rank (of its first token, 1 = top) on the question and paraphrase prompts, before and after;
the control prompts' answer log-probability change (locality); and held-out perplexity of the NPT model
(:func:`npt_ds.train.evaluate.evaluate`) before and after (damage).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from torch import nn

from ..config import DataConfig
from ..data.sources import eval_batches
from ..model.inject import injections_of
from ..train.evaluate import evaluate
from .inject import inject_text
from .session import add_np_arguments, load_npt, parse_floats

FACT_KEYS = {"id": str, "context": str, "prompts": list, "paraphrases": list, "answer": str, "controls": list}


def load_facts(paths: list[str]) -> list[dict]:
    """Facts from JSONL files; a malformed line is a one-line error naming file:line and the key."""
    facts = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"facts file {path} not found; give JSONL files such as data/facts/*.jsonl")
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                fact = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
            for key, kind in FACT_KEYS.items():
                if not isinstance(fact.get(key), kind) or not fact[key]:
                    raise ValueError(f"{path}:{n}: key {key!r} must be a non-empty {kind.__name__}")
            for c in fact["controls"]:
                if not (isinstance(c, dict) and c.get("prompt") and c.get("answer")):
                    raise ValueError(f"{path}:{n}: each control needs 'prompt' and 'answer'")
            facts.append(fact)
    if not facts:
        raise ValueError(f"no facts in {', '.join(paths)}")
    return facts


@torch.no_grad()
def answer_score(model: nn.Module, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    """-> (log p(answer | prompt) summed over the answer's tokens, rank of its first token (1 = most likely))."""
    p = list(tokenizer(prompt)["input_ids"])
    a = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([p + a], dtype=torch.long)
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, len(p) - 1:-1].double(), -1)
    target = torch.tensor(a)
    total = float(logp.gather(1, target[:, None]).sum())
    rank = int((logp[0] > logp[0, target[0]]).sum()) + 1
    return total, rank


def score_fact(model, tokenizer, fact: dict) -> dict:
    ans = fact["answer"]
    return {"prompts": [answer_score(model, tokenizer, q, ans) for q in fact["prompts"]],
            "paraphrases": [answer_score(model, tokenizer, q, ans) for q in fact["paraphrases"]],
            "controls": [answer_score(model, tokenizer, c["prompt"], c["answer"])[0] for c in fact["controls"]]}


class WeightSnapshot:
    """The NPT layers' MLP input weights and the injection records, to undo an injection exactly."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()
                       if ".mlp.gate_proj." in n or ".mlp.up_proj." in n}
        inj = injections_of(model)
        self.deltas, self.records = dict(inj.deltas), list(inj.records)

    @torch.no_grad()
    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        for n, v in self.params.items():
            params[n].copy_(v)
        self.model.npt_injections.deltas, self.model.npt_injections.records = dict(self.deltas), list(self.records)


def _ppl(model, batches) -> float:
    return evaluate(model, batches)["eval/ppl_npt"]


def _geo(ranks: list[int]) -> float:
    return math.exp(statistics.fmean(math.log(r) for r in ranks))


def summarise(alpha: float, before: list[dict], after: list[dict], ppl_before: float, ppl_after: list[float]) -> dict:
    def ranks(rows, key):
        return [r for row in rows for _, r in row[key]]

    def logps(rows, key):
        return [lp for row in rows for lp, _ in row[key]]

    q_b, q_a = ranks(before, "prompts"), ranks(after, "prompts")
    p_b, p_a = ranks(before, "paraphrases"), ranks(after, "paraphrases")
    ctrl = [a - b for rb, ra in zip(before, after) for b, a in zip(rb["controls"], ra["controls"])]
    return {"alpha": alpha,
            "question_rank_median": [statistics.median(q_b), statistics.median(q_a)],
            "question_rank_geomean": [_geo(q_b), _geo(q_a)],
            "question_top1": [sum(r == 1 for r in q_b) / len(q_b), sum(r == 1 for r in q_a) / len(q_a)],
            "question_logp_mean": [statistics.fmean(logps(before, "prompts")), statistics.fmean(logps(after, "prompts"))],
            "paraphrase_rank_median": [statistics.median(p_b), statistics.median(p_a)],
            "paraphrase_rank_geomean": [_geo(p_b), _geo(p_a)],
            "paraphrase_logp_mean": [statistics.fmean(logps(before, "paraphrases")),
                                     statistics.fmean(logps(after, "paraphrases"))],
            "rank_gain": _geo(q_b) / _geo(q_a),
            "control_dlogp_mean": statistics.fmean(ctrl), "control_dlogp_abs_mean": statistics.fmean(abs(d) for d in ctrl),
            "ppl_before": ppl_before, "ppl_after_mean": statistics.fmean(ppl_after),
            "ppl_damage_pct": 100.0 * (statistics.fmean(ppl_after) / ppl_before - 1.0)}


def run_inject_eval(model: nn.Module, tokenizer, facts: list[dict], alphas: list[float], *, layers: str | None,
                    positions: str, ppl_batches: int, ppl_seq_len: int, log=print) -> dict:
    batches = eval_batches(DataConfig(eval_batches=ppl_batches, eval_seq_len=ppl_seq_len), tokenizer)
    snapshot = WeightSnapshot(model)
    before = [score_fact(model, tokenizer, f) for f in facts]
    ppl_before = _ppl(model, batches)
    results = {"facts": len(facts), "layers": layers, "positions": positions, "ppl_tokens": ppl_batches * ppl_seq_len,
               "alphas": [], "per_fact": []}
    for alpha in alphas:
        after, ppls = [], []
        for fact, b in zip(facts, before):
            inject_text(model, tokenizer, fact["context"], layers=layers, positions=positions, alpha=alpha)
            after.append(score_fact(model, tokenizer, fact))
            ppls.append(_ppl(model, batches))
            snapshot.restore()
            results["per_fact"].append({"alpha": alpha, "id": fact["id"], "before": b, "after": after[-1],
                                        "ppl_after": ppls[-1]})
        results["alphas"].append(summarise(alpha, before, after, ppl_before, ppls))
        log(f"alpha {alpha}: done ({len(facts)} facts)")
    results["best_alpha"] = best_alpha(results["alphas"])
    return results


def best_alpha(rows: list[dict], max_damage_pct: float = 2.0) -> float | None:
    """The alpha with the largest answer-rank gain among those with ppl damage <= max_damage_pct (None if none)."""
    ok = [r for r in rows if r["ppl_damage_pct"] <= max_damage_pct]
    return max(ok, key=lambda r: r["rank_gain"])["alpha"] if ok else None


def table(results: dict) -> list[str]:
    head = (f"{'alpha':>6} | {'question rank med (geo)':>30} | {'top-1':>11} | {'question logp':>15} | "
            f"{'paraphrase rank med (geo)':>30} | {'ctrl dlogp (|.|)':>17} | {'ppl damage':>10}")
    lines = [head, "-" * len(head)]
    for r in results["alphas"]:
        q, qg, p, pg = (r["question_rank_median"], r["question_rank_geomean"], r["paraphrase_rank_median"],
                        r["paraphrase_rank_geomean"])
        top, lp = r["question_top1"], r["question_logp_mean"]
        cells = [f"{q[0]:g} ({qg[0]:.1f}) -> {q[1]:g} ({qg[1]:.1f})", f"{top[0]:.0%} -> {top[1]:.0%}",
                 f"{lp[0]:.2f} -> {lp[1]:.2f}", f"{p[0]:g} ({pg[0]:.1f}) -> {p[1]:g} ({pg[1]:.1f})",
                 f"{r['control_dlogp_mean']:+.3f} ({r['control_dlogp_abs_mean']:.3f})"]
        lines.append(f"{r['alpha']:>6g} | {cells[0]:>30} | {cells[1]:>11} | {cells[2]:>15} | {cells[3]:>30} | "
                     f"{cells[4]:>17} | {r['ppl_damage_pct']:>+9.2f}%")
    best = results["best_alpha"]
    lines.append(f"best answer-rank gain at <= 2 % perplexity damage: "
                 + ("none of these alphas" if best is None else f"alpha {best:g}"))
    return lines


def add_inject_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("facts", nargs="+", help="facts JSONL files (data/facts/*.jsonl)")
    add_np_arguments(parser)
    parser.add_argument("--alpha", default="0.25,0.5,1,2", help="comma-separated alphas")
    parser.add_argument("--layers", help="NPT layers to inject into; default: every NPT layer")
    parser.add_argument("--positions", default="last", help="as for inject")
    parser.add_argument("--ppl-batches", type=int, default=2, help="held-out windows for the perplexity damage")
    parser.add_argument("--ppl-seq-len", type=int, default=128)
    parser.add_argument("--out", help="write the results as JSON here")


def run_inject_eval_command(args) -> int:
    alphas = parse_floats(args.alpha, "--alpha")
    facts = load_facts(args.facts)
    model, tokenizer, layers = load_npt(args.np, args.model)
    results = run_inject_eval(model, tokenizer, facts, alphas, layers=args.layers, positions=args.positions,
                              ppl_batches=args.ppl_batches, ppl_seq_len=args.ppl_seq_len)
    results["np"] = args.np
    print(f"{len(facts)} facts, NPT layers {layers}, injected into {args.layers or 'all NPT layers'}, "
          f"positions {args.positions}; ppl on {results['ppl_tokens']} held-out tokens")
    print("\n".join(table(results)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return 0
