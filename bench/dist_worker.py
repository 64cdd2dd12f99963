"""`npt_ds.train` with optional bench-only monkeypatches, to measure recommended npt_ds changes
under the real trainer without editing npt_ds:

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
"""
from __future__ import annotations

import sys

PATCHES = ("z3_leaf", "no_mask_sync")


def patch_z3_leaf() -> None:
    """Mark every decoder layer that is not an NPT layer as a ZeRO-3 leaf module."""
    import npt_ds.train.trainer as trainer_mod
    from deepspeed.utils import set_z3_leaf_module
    from npt_ds.model import decoder_layers
    from npt_ds.model.npt_layer import NPTDecoderLayer

    orig_convert = trainer_mod.convert_model

    def convert_model(model, cfg, *args, **kwargs):
        out = orig_convert(model, cfg, *args, **kwargs)
        for layer in decoder_layers(model):
            if not isinstance(layer, NPTDecoderLayer):
                set_z3_leaf_module(layer, True)
        return out

    trainer_mod.convert_model = convert_model


def patch_no_mask_sync() -> None:
    import npt_ds.model.fused as fused_mod

    orig = fused_mod.create_causal_mask

    def create_causal_mask(*args, position_ids=None, **kwargs):
        return orig(*args, position_ids=None, **kwargs)

    fused_mod.create_causal_mask = create_causal_mask


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
