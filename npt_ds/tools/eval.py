"""`npt-ds eval`: base vs NPT perplexity on held-out text, with a bootstrap interval of their ratio.

``--against OTHER.json`` (another run's ``--out``, on the same windows) adds the paired interval of the difference
of the two ratios: the way to tell two variants apart beyond the choice of windows."""
from __future__ import annotations

import argparse
import json

import torch

from ..config import ConfigError, ModelConfig
from ..data.eval_data import describe, eval_data_config
from ..data.sources import eval_batches
from ..model import convert_model, load_base_model, load_np_weights, load_tokenizer
from ..parallel.groups import init_distributed
from ..train.evaluate import evaluate
from .bootstrap import bootstrap_difference, bootstrap_ratio
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
    parser.add_argument("--against", help="another evaluation's --out JSON on the same windows: also print this "
                        "ratio minus that one, with its paired bootstrap interval")


def read_windows(path: str) -> dict:
    """The per-window NLL sums of an earlier `npt-ds eval --out` file; bad files are one-line ConfigErrors."""
    try:
        with open(path) as f:
            windows = json.load(f)["windows"]
        if not all(isinstance(windows[k], list) for k in ("nll_base", "nll_npt", "tokens")):
            raise TypeError
    except FileNotFoundError:
        raise ConfigError(f"--against: {path} not found; pass a file written by npt-ds eval --out") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--against: {path} holds no per-window NLL sums (windows.nll_base/nll_npt/tokens); "
                          "pass a file written by npt-ds eval --out") from None
    return windows


def run_eval(args) -> int:
    other = read_windows(args.against) if args.against else None
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
    if other is not None:
        try:
            diff = bootstrap_difference(win, other, resamples=args.bootstrap, seed=args.seed)
        except ValueError as exc:
            raise ConfigError(f"--against {args.against}: {exc}") from None
        result.update({"eval/ratio_minus_other": diff.ratio, "eval/ratio_minus_other_low": diff.low,
                       "eval/ratio_minus_other_high": diff.high})
        print(f"  minus --against  {diff.ratio:+10.4f}  95% CI [{diff.low:+.4f}, {diff.high:+.4f}] "
              f"(paired bootstrap over the same {diff.windows} windows)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "windows": win}, f, indent=2)
        print(f"wrote {args.out}")
    return 0
