"""NP weights in a checkpoint are gathered and written one NPT layer at a time; every reader takes both layouts."""
from __future__ import annotations

import torch

from npt_ds.cli import main as npt_ds
from npt_ds.config import NPTConfig
from npt_ds.model import convert_model, load_np_weights, np_named_parameters, save_np_weights, tiny_llama


def converted(seed: int = 0):
    model = tiny_llama(seed=seed)
    convert_model(model, NPTConfig(layers="1,3", rank=4, init_std_b=0.05))
    with torch.no_grad():
        for _, p in np_named_parameters(model):
            p.normal_(std=0.1)
    return model


def test_per_layer_files_load_like_the_single_file(tmp_path):
    model = converted()
    save_np_weights(model, tmp_path / "single")
    save_np_weights(model, tmp_path / "layers", per_layer=True)
    assert sorted(p.name for p in (tmp_path / "layers").glob("np_weights*")) == [
        "np_weights-layer-001.safetensors", "np_weights-layer-003.safetensors"]
    want = dict(np_named_parameters(model))
    for layout in ("single", "layers"):
        fresh = tiny_llama()
        assert load_np_weights(fresh, tmp_path / layout) == [1, 3]
        got = dict(np_named_parameters(fresh))
        assert sorted(got) == sorted(want)
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=0, atol=0)


def test_the_tools_read_a_checkpoints_per_layer_np_dir(tmp_path, capsys):
    save_np_weights(converted(), tmp_path / "np", per_layer=True)
    assert npt_ds(["export", "--model", "tiny", "--np", str(tmp_path / "np"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert npt_ds(["inject", "--model", "tiny", "--np", str(tmp_path / "np"), "--context", "Paris.", "--out",
                   str(tmp_path / "inj")]) == 0
    assert "1 injection(s)" in capsys.readouterr().out
