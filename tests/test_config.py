"""Config validation, recipes, DeepSpeed config building, hostfiles: one-line errors that name the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from npt_ds.config import ConfigError, config_from_dict, load_config
from npt_ds.data.sources import PackedBatches
from npt_ds.parallel.ds_config import build_ds_config
from npt_ds.parallel.hostfile import HostfileError, check_hostfile
from npt_ds.config import parse_layer_spec
from npt_ds.planning.shape import load_shape

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(recipe):
    cfg = load_config(recipe)
    ds = build_ds_config(cfg, world_size=16)
    assert ds["train_batch_size"] == cfg.data.micro_batch_size * cfg.optim.grad_accum * 16
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    shape = load_shape(cfg.model.path, cfg.model.tiny)
    assert parse_layer_spec(cfg.npt.layers, shape.num_layers)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"smollm2_demo.yaml", "llama3_8b_multinode.yaml", "tiny_debug.yaml"} <= names


@pytest.mark.parametrize("data,msg", [
    ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'; did you mean optim.lr?"),
    ({"modle": {}}, "unknown config key 'modle'; did you mean model?"),
    ({"npt": {"rank": "big"}}, "npt.rank: expected int, got str 'big'"),
    ({"npt": {"rank": 0}}, "npt.rank must be a positive integer"),
    ({"schedule": {"mode": "parallel"}}, "schedule.mode: 'parallel' is not one of single_layer, multi_layer, sequential"),
    ({"loss": {"direct_target": "states"}}, "loss.direct_target: 'states' is not one of delta, state"),
    ({"model": {"quantization": "nf4"}, "deepspeed": {"precision": "fp16"}}, "fp16 cannot be combined with model.quantization=nf4"),
    ({"npt": {"safe_mode": True, "multiplicative": True}}, "safe_mode allows additive modulation only"),
    ({"data": {"source": "files"}}, "data.files: source 'files' needs a list of local files"),
    ({"optim": {"param_groups": [{"pattern": "*", "lr_multiplier": 2}]}}, "unknown key 'lr_multiplier'"),
    ({"model": {"teacher_path": "tiny"}}, "model.teacher_path is set but loss.kd_weight is 0"),
])
def test_bad_config_gives_one_line_error(data, msg):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert msg in one_line_error(err)


def test_yaml_scientific_notation_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-3}\nnpt: {layers: 14}\n")
    cfg = load_config(path, ["schedule.total_steps=7", "inject_nan={step: 3, rank: 1}"])
    assert cfg.optim.lr == 1e-3 and cfg.npt.layers == "14" and cfg.schedule.total_steps == 7
    assert cfg.inject_nan == {"step": 3, "rank": 1}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(path, ["schedule.total_steps"])


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found; pass a recipe"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(bad)
    one_line_error(err)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "smollm2_demo.yaml")
    cfg.save(tmp_path / "config.json")
    import json

    assert config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_ds_config_precision_and_stage():
    cfg = config_from_dict({"deepspeed": {"config": "ds_configs/zero3_fp32.json", "precision": "bf16",
                                          "zero_stage": 2}, "optim": {"lr": 0.5, "grad_accum": 3}})
    ds = build_ds_config(cfg, world_size=2)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == 0.5 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 2
    with pytest.raises(ConfigError, match="deepspeed.config: 'nope.json' not found"):
        build_ds_config(config_from_dict({"deepspeed": {"config": "nope.json"}}), 1)


def test_unknown_dataset_file_is_named(tmp_path):
    cfg = config_from_dict({"data": {"source": "files", "files": [str(tmp_path / "missing.jsonl")]}})
    with pytest.raises(ConfigError, match=r"data.files: file '.*missing.jsonl' not found") as err:
        next(PackedBatches(cfg.data, tokenizer=None))
    one_line_error(err)


def test_local_jsonl_files_are_packed(tmp_path):
    from npt_ds.model import ByteTokenizer

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello world"}\n{"text": "another document here"}\n' * 20)
    cfg = config_from_dict({"data": {"source": "files", "files": [str(path)], "seq_len": 16, "micro_batch_size": 2}})
    batches = PackedBatches(cfg.data, ByteTokenizer(), rank=0, world_size=2)
    first = next(batches)
    assert first.shape == (2, 16)
    other = PackedBatches(cfg.data, ByteTokenizer(), rank=1, world_size=2)
    assert not (next(other) == first).all()  # disjoint shards


def test_hostfile_checks(tmp_path):
    good = tmp_path / "hosts"
    good.write_text("# two nodes\nlocalhost slots=2\n127.0.0.1 slots=2\n")
    assert check_hostfile(good, num_nodes=2, resolve=True) == [("localhost", 2), ("127.0.0.1", 2)]
    with pytest.raises(HostfileError, match="NUM_NODES=3 but hostfile .* lists only 2 host") as err:
        check_hostfile(good, num_nodes=3)
    one_line_error(err)
    missing = tmp_path / "missing-host"
    missing.write_text("localhost slots=1\nno-such-host.invalid slots=1\n")
    with pytest.raises(HostfileError, match="host 'no-such-host.invalid' does not resolve"):
        check_hostfile(missing, resolve=True)
    bad = tmp_path / "bad"
    bad.write_text("node1 gpus=8\n")
    with pytest.raises(HostfileError, match="is not 'host slots=N'"):
        check_hostfile(bad)
    with pytest.raises(HostfileError, match="not found; copy launch/hostfile.example"):
        check_hostfile(tmp_path / "none")


def test_launch_scripts_dry_run_and_missing_config(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "MASTER_PORT": "29999"}
    out = subprocess.run(["bash", "launch/train_local.sh", "configs/tiny_debug.yaml", "schedule.total_steps=3"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0
    assert "deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port 29999 --module npt_ds.train " \
           "--config configs/tiny_debug.yaml schedule.total_steps=3" in out.stderr
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=8\n")
    out = subprocess.run(["bash", "launch/train_multinode.sh", "configs/llama3_8b_multinode.yaml"], cwd=REPO,
                         env={**env, "HOSTFILE": str(hosts), "NUM_NODES": "2"}, capture_output=True, text=True)
    assert out.returncode == 2 and "lists only 1 host(s)" in out.stderr
    out = subprocess.run(["bash", "launch/train_local.sh", "configs/nope.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "config 'configs/nope.yaml' not found" in out.stderr


def test_deepspeed_env_keeps_the_users_lines_and_is_private(tmp_path):
    from npt_ds.parallel.cluster import BEGIN, END, run_environment, write_deepspeed_env

    path = tmp_path / ".deepspeed_env"
    path.write_text("MY_TOKEN=abc\nOMP_NUM_THREADS=8\n")
    env = run_environment({"OMP_NUM_THREADS": "1", "WANDB_API_KEY": "k", "HF_HUB_OFFLINE": "1", "HOME": "/root",
                           "NPT_DS_RESTART": "2"})
    assert env == {"HF_HUB_OFFLINE": "1", "NPT_DS_RESTART": "2", "OMP_NUM_THREADS": "1", "WANDB_API_KEY": "k"}
    write_deepspeed_env(path, env)
    write_deepspeed_env(path, {**env, "NPT_DS_RESTART": "3"})  # a second attempt replaces the block only
    lines = path.read_text().splitlines()
    assert lines == ["MY_TOKEN=abc", "OMP_NUM_THREADS=8", BEGIN, "HF_HUB_OFFLINE=1", "NPT_DS_RESTART=3",
                     "WANDB_API_KEY=k", END]  # the user's OMP_NUM_THREADS wins
    assert all("=" in line for line in lines)  # DeepSpeed's launcher splits every line at '='
    assert path.stat().st_mode & 0o777 == 0o600
