"""`npt-ds inject`: fold a context's modulation into the NPT layers' weights and save it as deltas.

The output dir is an NP dir (np_weights.safetensors + npt_spec.json) plus injections.safetensors (the summed
W_gate / W_up deltas) and injections.json (context, baseline, layers, positions, alpha of each injection);
`generate`, `eval`, `export` and later `inject` calls load them through ``load_np_weights``.
"""
from __future__ import annotations

import argparse

from ..config import ConfigError, parse_layer_spec
from ..model import decoder_layers, inject, save_np_weights
from .session import add_np_arguments, encode, load_npt


def layer_list(model, spec: str | None) -> list[int] | None:
    """--layers parsed against the model (None = every NPT layer)."""
    if spec is None:
        return None
    try:
        return parse_layer_spec(spec, len(decoder_layers(model)))
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("npt.layers", "--layers")) from None


def context_ids(tokenizer, text: str | None, flag: str):
    if text is None:
        return None
    if not text.strip():
        raise ValueError(f"{flag}: the text is empty; give the text whose modulation to fold")
    return encode(tokenizer, text)


def inject_text(model, tokenizer, context: str, *, layers: str | None = None, positions: str = "last",
                alpha: float = 1.0, baseline: str | None = None) -> dict:
    """Fold `context` (minus `baseline`) into the model; -> the record kept with the deltas."""
    ids = context_ids(tokenizer, context, "--context")
    base_ids = context_ids(tokenizer, baseline, "--baseline")
    chosen = layer_list(model, layers)
    record = {"context": context, "baseline": baseline,
              "layers": chosen if chosen is not None else list(model.npt_layer_indices),
              "positions": positions, "alpha": alpha, "tokens": int(ids.shape[1])}
    inject(model, ids, record, layers=chosen, positions=positions, alpha=alpha, baseline_ids=base_ids)
    return record


def add_inject_arguments(parser: argparse.ArgumentParser) -> None:
    add_np_arguments(parser)
    parser.add_argument("--context", help="the text whose modulation to commit")
    parser.add_argument("--layers", help="NPT layers to inject into ('26,27', '26-29'); default: every NPT layer")
    parser.add_argument("--positions", default="last",
                        help="tokens whose modulation folds: last, all (sum), mean, or i:j (mean over tokens i..j-1)")
    parser.add_argument("--alpha", type=float, default=1.0, help="strength of the update")
    parser.add_argument("--baseline", help="differential injection: fold context minus this text's modulation")
    parser.add_argument("--reset", action="store_true", help="drop the injections saved in --np first")
    parser.add_argument("--out", required=True, help="NP dir to write (may be --np itself)")


def run_inject(args) -> int:
    if args.context is None and not args.reset:
        raise ValueError("--context: give the text to inject (or --reset to drop the saved injections)")
    model, tokenizer, _ = load_npt(args.np, args.model, injections=not args.reset)
    if args.context is not None:
        inject_text(model, tokenizer, args.context, layers=args.layers, positions=args.positions,
                    alpha=args.alpha, baseline=args.baseline)
    out = save_np_weights(model, args.out)
    records = model.npt_injections.records
    print(f"{len(records)} injection(s) in {out}" + ("" if not records else
          f"; latest: layers {records[-1]['layers']}, positions {records[-1]['positions']}, "
          f"alpha {records[-1]['alpha']}, {records[-1]['tokens']} context tokens"))
    return 0
