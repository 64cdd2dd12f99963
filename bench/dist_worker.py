"""`npt_ds.train` with optional bench-only monkeypatches, to measure recommended npt_ds changes under the real
trainer without editing npt_ds, and to train random-weight shapes for the GPU check:

    deepspeed --num_gpus 2 --module bench.dist_worker --patch z3_leaf --config X.yaml [overrides]

Patches:
* ``z3_leaf`` -- every decoder layer that is not an NPT layer becomes a ZeRO-3 leaf module
  (`deepspeed.utils.set_z3_leaf_module`): ZeRO-3 then gathers/releases the layer's weights in one
  hook pair instead of one per submodule (SmolLM2 upper-half: ~530 -> ~320 hooked module calls
  per step).  NPT layers themselves cannot simply be leaves: `fused()` is not their `forward`, and
  in single-layer mode none of their inputs requires grad, so the leaf's post-backward hook
  fires (and releases the weights) before the layer's own backward runs.
* ``no_mask_sync`` -- `create_causal_mask` without `position_ids` (positions are a plain arange),
  which removes transformers' packed-sequence check, a host sync (`.all()` -> bool) per forward.
* ``shape_model`` -- ``model.path`` may name a shape preset (npt_ds/planning/shapes/*.json, e.g. llama-3.1-8b):
  the base is then that config with random weights, initialised on this rank's device (partitioned as it is
  made under ZeRO-3), with the byte tokenizer; nothing is downloaded, and `npt-ds plan` reads the same shape.
  Any other path loads as npt_ds does.  (bench/gpu_check.py's training runs.)
* ``clock_check`` -- every train line also carries rank 0's per-step ``clock/wall_s``, ``clock/host_own_s``
  (wall less host-blocked collective time) and on CUDA ``clock/stream_own_s`` (the CUDA-event clock that
  ``rank/{r}/step_s`` reports there; npt_ds/metrics/rank_stats.py).
"""
from __future__ import annotations

import sys

PATCHES = ("z3_leaf", "no_mask_sync", "shape_model", "clock_check")


def patch_z3_leaf() -> None:
    """Mark every decoder layer that is not an NPT layer as a ZeRO-3 leaf module."""
    import npt_ds.train.build as build_mod
    from deepspeed.utils import set_z3_leaf_module
    from npt_ds.model import decoder_layers
    from npt_ds.model.npt_layer import NPTDecoderLayer

    orig_convert = build_mod.convert_model

    def convert_model(model, cfg, *args, **kwargs):
        out = orig_convert(model, cfg, *args, **kwargs)
        for layer in decoder_layers(model):
            if not isinstance(layer, NPTDecoderLayer):
                set_z3_leaf_module(layer, True)
        return out

    build_mod.convert_model = convert_model


def patch_no_mask_sync() -> None:
    import npt_ds.model.fused as fused_mod

    orig = fused_mod.create_causal_mask

    def create_causal_mask(*args, position_ids=None, **kwargs):
        return orig(*args, position_ids=None, **kwargs)

    fused_mod.create_causal_mask = create_causal_mask


def is_shape_preset(path: str) -> bool:
    from .models import SHAPES_DIR

    return "/" not in path and (SHAPES_DIR / f"{path}.json").is_file()


def patch_shape_model() -> None:
    import torch

    import npt_ds.train.build as build_mod
    import npt_ds.train.trainer as trainer_mod
    from npt_ds.model import ByteTokenizer
    from npt_ds.model.loading import DTYPES
    from npt_ds.parallel.groups import local_rank

    from .models import random_model, shape_config

    load_model, load_tokenizer = build_mod.load_base_model, trainer_mod.load_tokenizer

    def load_base_model(cfg, seed=0):
        if not is_shape_preset(cfg.path):
            return load_model(cfg, seed)
        device = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
        return random_model(shape_config(cfg.path), DTYPES[cfg.dtype], device, seed)

    def tokenizer(cfg):
        return ByteTokenizer() if is_shape_preset(cfg.path) else load_tokenizer(cfg)

    build_mod.load_base_model, trainer_mod.load_tokenizer = load_base_model, tokenizer


def patch_clock_check() -> None:
    from npt_ds.metrics.rank_stats import RankStats

    record = RankStats.record

    def with_clocks(self, tokens_per_s):
        out = record(self, tokens_per_s)
        out.update({f"clock/{k}": round(v, 6) for k, v in self.last_window.items() if v is not None})
        return out

    RankStats.record = with_clocks


def apply(patches: list[str]) -> None:
    for name in patches:
        if name not in PATCHES:
            raise SystemExit(f"--patch: unknown patch {name!r}; choose from {', '.join(PATCHES)}")
        globals()[f"patch_{name}"]()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    patches: list[str] = []
    while "--patch" in argv:
        i = argv.index("--patch")
        patches += [p for p in argv[i + 1].split(",") if p]
        del argv[i:i + 2]
    apply(patches)
    from npt_ds.train.run import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
