"""`npt-ds export`: a self-contained Hugging Face model directory of a trained NPT.

The directory holds config.json (model_type ``npt_llama``, ``auto_map`` to the bundled modeling_npt.py, which
imports only torch + transformers), model.safetensors (base + NP weights, injected deltas already added to
W_gate / W_up), the tokenizer files, generation_config.json and a model card (README.md).  Load it with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``; lm-eval reads it with
``--model hf --model_args pretrained=DIR,trust_remote_code=True``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .session import add_np_arguments, load_npt

TEMPLATE = Path(__file__).parent / "export_template" / "modeling_npt.py"
AUTO_MAP = {"AutoConfig": "modeling_npt.NPTLlamaConfig", "AutoModelForCausalLM": "modeling_npt.NPTLlamaForCausalLM"}


def export_config(model: nn.Module) -> dict:
    """The base's Llama config plus the NPT fields the bundled modeling_npt.py reads."""
    cfg = model.npt_config
    data = model.config.to_dict()
    for key in ("_name_or_path", "auto_map", "architectures", "transformers_version", "quantization_config"):
        data.pop(key, None)
    data.update(model_type="npt_llama", architectures=["NPTLlamaForCausalLM"], auto_map=AUTO_MAP,
                npt_layers=list(model.npt_layer_indices), npt_rank=cfg.rank, npt_num_ranks=cfg.num_ranks,
                npt_modulation_scale=cfg.modulation_scale, npt_dual=cfg.dual and not cfg.safe_mode,
                npt_multiplicative=cfg.multiplicative and not cfg.safe_mode, npt_down_bias=cfg.down_bias,
                dtype="float32", use_cache=True)
    return data


def training_provenance(np_dir: str | Path) -> dict:
    """What the NP dir's training run says about it: run dir, step, recipe, the last eval at or before that step."""
    np_dir = Path(np_dir).resolve()
    step_dir = np_dir.parent
    meta_path = step_dir / "meta.json"
    if not meta_path.is_file():
        return {}
    meta = json.loads(meta_path.read_text())
    run_dir = step_dir.parent.parent
    info = {"run_dir": str(run_dir), "step": meta.get("step"), "tokens_seen": meta.get("tokens_seen"),
            "schedule_mode": meta.get("config", {}).get("schedule", {}).get("mode")}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("event") == "eval" and row.get("step", 0) <= (info["step"] or 0):
                info["eval"] = {k: row[k] for k in ("step", "eval/ppl_base", "eval/ppl_npt", "eval/fidelity_mse",
                                                    "eval/tokens") if k in row}
    return info


def model_card(model: nn.Module, base: str, np_dir: str, provenance: dict) -> str:
    cfg = model.npt_config
    lines = ["---", "library_name: transformers", "tags: [npt, neuro-plastic-transformer, llama]", "---", "",
             "# NPT model exported by npt-ds", "",
             f"- **Base**: `{base}` ({model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}, "
             f"d_ffn {model.config.intermediate_size})",
             f"- **NPT layers**: {list(model.npt_layer_indices)}",
             f"- **NP component**: rank {cfg.rank}, {cfg.num_ranks} rank-1 term(s), modulation_scale "
             f"{cfg.modulation_scale}, dual {cfg.dual}, multiplicative {cfg.multiplicative}",
             f"- **NP weights**: `{np_dir}`"]
    if provenance:
        lines.append(f"- **Training run**: `{provenance['run_dir']}`, step {provenance['step']} "
                     f"({provenance.get('tokens_seen')} tokens, mode {provenance.get('schedule_mode')})")
        ev = provenance.get("eval")
        if ev:
            lines.append(f"- **Held-out eval** (step {ev.get('step')}, {ev.get('eval/tokens')} tokens): perplexity "
                         f"base {ev['eval/ppl_base']:.3f}, NPT {ev['eval/ppl_npt']:.3f}, final-state fidelity MSE "
                         f"{ev['eval/fidelity_mse']:.4g}")
    records = getattr(getattr(model, "npt_injections", None), "records", [])
    if records:
        lines.append(f"- **Injected contexts** ({len(records)}, folded into W_gate):")
        lines += [f"  - {json.dumps(r)}" for r in records]
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)", "```", "",
              "`lm-eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks hellaswag`", ""]
    return "\n".join(lines)


def export(model: nn.Module, tokenizer, out_dir: str | Path, *, base: str, np_dir: str) -> Path:
    """Write the HF directory for `model` (an npt-ds model with its NP weights and injections loaded)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").float().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(export_config(model), indent=2))
    shutil.copyfile(TEMPLATE, out / "modeling_npt.py")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(model_card(model, base, np_dir, training_provenance(np_dir)))
    return out


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_np_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory")


def run_export(args) -> int:
    model, tokenizer, layers = load_npt(args.np, args.model)
    out = export(model, tokenizer, args.out, base=args.model, np_dir=args.np)
    print(f"exported NPT layers {layers} ({len(model.npt_injections.records)} injection(s) folded in) -> {out}; "
          f"load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0
