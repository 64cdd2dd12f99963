"""`npt-ds eval`: base vs NPT perplexity on held-out text, with a bootstrap interval of their ratio."""
from __future__ import annotations

import argparse
import json

import torch

from ..config import ModelConfig
from ..data.eval_data import describe, eval_data_config
from ..data.sources import eval_batches
from ..model import convert_model, load_base_model, load_np_weights, load_tokenizer
from ..parallel.groups import init_distributed
from ..train.evaluate import evaluate
from .bootstrap import bootstrap_ratio
from .session import add_model_arguments, npt_config_of


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--np", help="NP weights dir (from convert or a checkpoint's np/); default: fresh init")
    parser.add_argument("--data", help="held-out text: a prepared dir, local files (a,b), 'shakespeare' (default: "
                        "the held-out plays) or a hub dataset")
    parser.add_argument("--split", default="validation", help="hub dataset split (with --data NAME)")
    parser.add_argument("--holdout", help="Shakespeare plays held out, e.g. hamlet,tempest (default: the recipe's)")
    parser.add_argument("--batches", type=int, default=4, help="held-out windows (one per batch)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bootstrap", type=int, default=2000,
                        help="bootstrap resamples for the ratio's 95%% interval")
    parser.add_argument("--out", help="write the numbers (and per-window NLL sums) as JSON here")


def run_eval(args) -> int:
    data = eval_data_config(args.data, args.batches, args.seq_len, split=args.split,
                            holdout=[h for h in (args.holdout or "").split(",") if h])

    init_distributed()
    torch.manual_seed(args.seed)
    mcfg = ModelConfig(path=args.model)
    model = load_base_model(mcfg, seed=args.seed)
    if args.np:
        layers = load_np_weights(model, args.np)
        n_inj = len(model.npt_injections.records)
        source = f"NP weights {args.np}" + (f", {n_inj} injection(s)" if n_inj else "")
    else:
        layers = convert_model(model, npt_config_of(args))
        source = "freshly initialised NP components"
    result = evaluate(model, eval_batches(data, load_tokenizer(mcfg)), per_window=True)
    win = result.pop("windows")
    print(f"{describe(data)}, {len(win['tokens'])} windows, {result['eval/tokens']} tokens; "
          f"NPT layers {layers} ({source})")
    print(f"  base perplexity  {result['eval/ppl_base']:10.3f}")
    print(f"  NPT perplexity   {result['eval/ppl_npt']:10.3f}")
    if len(win["tokens"]) >= 2:
        ci = bootstrap_ratio(win["nll_base"], win["nll_npt"], win["tokens"], resamples=args.bootstrap,
                             seed=args.seed)
        result.update({"eval/ppl_ratio": ci.ratio, "eval/ppl_ratio_low": ci.low, "eval/ppl_ratio_high": ci.high})
        print(f"  NPT/base ratio   {ci.ratio:10.4f}  95% CI [{ci.low:.4f}, {ci.high:.4f}] "
              f"(bootstrap over {ci.windows} windows, {ci.resamples} resamples, seed {args.seed})")
    else:
        result["eval/ppl_ratio"] = result["eval/ppl_npt"] / result["eval/ppl_base"]
        print(f"  NPT/base ratio   {result['eval/ppl_ratio']:10.4f}  (an interval needs >= 2 windows: raise --batches)")
    print(f"  fidelity MSE     {result['eval/fidelity_mse']:10.4g}  (final hidden state, NPT vs base)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "windows": win}, f, indent=2)
        print(f"wrote {args.out}")
    return 0
