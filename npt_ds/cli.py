"""`npt-ds` command line: prepare, train, sweep, convert, eval, plan, generate, export, inject, inject-eval.

    npt-ds prepare shakespeare --tokenizer smollm2 --out data/prepared/shakespeare
    npt-ds train configs/smollm2_demo.yaml [key.path=value ...]
    npt-ds convert --layers upper_half --out runs/np-init
    npt-ds eval [--np runs/demo/checkpoints/step-00000200/np] [--layers upper_half]
    npt-ds eval --np NP_DIR --data data/prepared/shakespeare-eval --batches 64 [--bootstrap 2000]
    npt-ds sweep sweeps/demo_ablation.yaml [--dry-run]
    npt-ds plan configs/llama3_8b_multinode.yaml --nodes 2 --gpus-per-node 8 --gpu-mem 80
    npt-ds generate --np NP_DIR --prompt "To be, or not" [--temperature 0.8 --top-p 0.9]
    npt-ds export --np NP_DIR --out HF_DIR
    npt-ds inject --np NP_DIR --context TEXT [--layers 26,27] [--positions last] [--alpha 1] --out DIR
    npt-ds inject-eval data/facts/*.jsonl --np NP_DIR [--alpha 0.25,0.5,1,2] [--out results.json]
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, ModelConfig, NPTConfig


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (PyPI asset, default), 'tiny', an HF dir, a .safetensors or .gguf file")
    parser.add_argument("--layers", default="upper_half", help="'14,15', '8-15', 'upper_half' or 'all'")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--num-ranks", type=int, default=1)
    parser.add_argument("--modulation-scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def _npt_config(args) -> NPTConfig:
    return NPTConfig(layers=args.layers, rank=args.rank, num_ranks=args.num_ranks,
                     modulation_scale=args.modulation_scale)


def run_convert(args) -> int:
    import torch

    from .model import convert_model, load_base_model, save_np_weights

    torch.manual_seed(args.seed)
    model = load_base_model(ModelConfig(path=args.model), seed=args.seed)
    layers = convert_model(model, _npt_config(args))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = save_np_weights(model, args.out)
    print(f"converted layers {layers} of {model.config.num_hidden_layers}: {n:,} NP parameters -> {out}")
    return 0


def run_eval(args) -> int:
    import torch

    from .data import eval_batches
    from .distributed import init_distributed
    from .evaluate import evaluate
    from .model import convert_model, load_base_model, load_np_weights, load_tokenizer
    from .tools.bootstrap import bootstrap_ratio
    from .tools.eval_data import describe, eval_data_config

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
        layers = convert_model(model, _npt_config(args))
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
        import json

        with open(args.out, "w") as f:
            json.dump({**result, "windows": win}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def run_generate(args) -> int:
    from .tools.generate import DecodeOptions, generate_text, interactive
    from .tools.session import load_npt

    opts = DecodeOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, chat=not args.no_chat)
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt: the prompt is empty; give some text (or --interactive)")
    model, tokenizer, _ = load_npt(args.np, args.model)
    if args.interactive:
        interactive(model, tokenizer, opts)
    else:
        generate_text(model, tokenizer, args.prompt, opts, stream=True)
    return 0


def run_export(args) -> int:
    from .tools.export import export
    from .tools.session import load_npt

    model, tokenizer, layers = load_npt(args.np, args.model)
    out = export(model, tokenizer, args.out, base=args.model, np_dir=args.np)
    print(f"exported NPT layers {layers} ({len(model.npt_injections.records)} injection(s) folded in) -> {out}; "
          f"load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def run_inject(args) -> int:
    from .tools.inject import run_inject as run

    return run(args)


def run_inject_eval(args) -> int:
    import json

    from .tools.inject_eval import load_facts, run_inject_eval as run, table
    from .tools.session import load_npt

    alphas = _floats(args.alpha, "--alpha")
    facts = load_facts(args.facts)
    model, tokenizer, layers = load_npt(args.np, args.model)
    results = run(model, tokenizer, facts, alphas, layers=args.layers, positions=args.positions,
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


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: cannot parse {text!r}; give numbers separated by commas, e.g. 0.25,0.5,1,2") from None
    if not values:
        raise ValueError(f"{flag}: no values in {text!r}; give e.g. 0.25,0.5,1,2")
    return values


def _np_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--np", required=True, help="NP weights dir (a checkpoint's np/, or an inject --out dir)")
    parser.add_argument("--model", default="smollm2",
                        help="the base the NP weights were trained on: 'smollm2' (default), 'tiny', an HF dir, a file")


def _add_tool_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with the NPT model (streamed)")
    _np_arguments(gen)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt")
    what.add_argument("--interactive", action="store_true", help="a prompt loop (EOF or 'exit' ends)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the tokenizer's chat template")
    exp = sub.add_parser("export", help="write a self-contained Hugging Face model dir (trust_remote_code)")
    _np_arguments(exp)
    exp.add_argument("--out", required=True, help="output directory")
    inj = sub.add_parser("inject", help="fold a context's modulation into the NPT layers' weights (saved as deltas)")
    _np_arguments(inj)
    inj.add_argument("--context", help="the text whose modulation to commit")
    inj.add_argument("--layers", help="NPT layers to inject into ('26,27', '26-29'); default: every NPT layer")
    inj.add_argument("--positions", default="last",
                     help="tokens whose modulation folds: last, all (sum), mean, or i:j (mean over tokens i..j-1)")
    inj.add_argument("--alpha", type=float, default=1.0, help="strength of the update")
    inj.add_argument("--baseline", help="differential injection: fold context minus this text's modulation")
    inj.add_argument("--reset", action="store_true", help="drop the injections saved in --np first")
    inj.add_argument("--out", required=True, help="NP dir to write (may be --np itself)")
    ie = sub.add_parser("inject-eval", help="measure knowledge injection on facts (answer rank, locality, damage)")
    ie.add_argument("facts", nargs="+", help="facts JSONL files (data/facts/*.jsonl)")
    _np_arguments(ie)
    ie.add_argument("--alpha", default="0.25,0.5,1,2", help="comma-separated alphas")
    ie.add_argument("--layers", help="NPT layers to inject into; default: every NPT layer")
    ie.add_argument("--positions", default="last", help="as for inject")
    ie.add_argument("--ppl-batches", type=int, default=2, help="held-out windows for the perplexity damage")
    ie.add_argument("--ppl-seq-len", type=int, default=128)
    ie.add_argument("--out", help="write the results as JSON here")


def build_parser() -> argparse.ArgumentParser:
    from .plan import add_plan_subparser
    from .prepare import add_prepare_subparser
    from .train import add_train_arguments

    parser = argparse.ArgumentParser(prog="npt-ds", description="NPT training on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_subparser(sub)
    train = sub.add_parser("train", help="train NP components (one process; use launch/*.sh for several)")
    add_train_arguments(train)
    convert = sub.add_parser("convert", help="convert layers and write the (initial) NP weights")
    _model_arguments(convert)
    convert.add_argument("--out", required=True, help="directory for np_weights.safetensors + npt_spec.json")
    ev = sub.add_parser("eval", help="base vs NPT perplexity on held-out Shakespeare plays")
    _model_arguments(ev)
    ev.add_argument("--np", help="NP weights dir (from convert or a checkpoint's np/); default: fresh init")
    ev.add_argument("--data", help="held-out text: a prepared dir, local files (a,b), 'shakespeare' (default: "
                    "the held-out plays) or a hub dataset")
    ev.add_argument("--split", default="validation", help="hub dataset split (with --data NAME)")
    ev.add_argument("--holdout", help="Shakespeare plays held out, e.g. hamlet,tempest (default: the recipe's)")
    ev.add_argument("--batches", type=int, default=4, help="held-out windows (one per batch)")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the ratio's 95%% interval")
    ev.add_argument("--out", help="write the numbers (and per-window NLL sums) as JSON here")
    sweep = sub.add_parser("sweep", help="run a base recipe under a list/grid of overrides and seeds; tabulate")
    sweep.add_argument("sweep_file", help="sweep YAML (sweeps/*.yaml)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    add_plan_subparser(sub)
    _add_tool_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import run_train

            return run_train(args)
        if args.command == "prepare":
            from .prepare import run_prepare

            return run_prepare(args)
        if args.command == "plan":
            from .plan import run_plan

            return run_plan(args)
        if args.command == "sweep":
            from .tools.sweep import run_sweep

            return run_sweep(args)
        return {"convert": run_convert, "eval": run_eval, "generate": run_generate, "export": run_export,
                "inject": run_inject, "inject-eval": run_inject_eval}[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"npt-ds {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
