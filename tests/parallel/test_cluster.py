"""What a multi-node launch hands the remote ranks: plain values in .deepspeed_env, secrets and values a shell would
change in a 0600 file read at start, byte for byte (the real two-host run is in test_distributed.py)."""
from __future__ import annotations

import json

import pytest

from npt_ds.config import ConfigError
from npt_ds.parallel.cluster import (SEALED_VAR, load_sealed_env, refuse_exposed_lines, split_environment,
                                     write_sealed_env)


def test_a_secret_in_a_deepspeed_env_line_is_refused(tmp_path, monkeypatch):
    plain, sealed = split_environment({"WANDB_PROJECT": "npt", "HF_TOKEN": "hf_x", "NCCL_SOCKET_IFNAME": "eth0",
                                       "WANDB_NOTES": 'say "hi"', "DB_PASSWORD": "pw", "OMP_NUM_THREADS": "1"})
    assert plain == {"WANDB_PROJECT": "npt", "NCCL_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
    assert sorted(sealed) == ["DB_PASSWORD", "HF_TOKEN", "WANDB_NOTES"]
    home = tmp_path / ".deepspeed_env"
    home.write_text("NCCL_DEBUG=INFO\nMY_SERVICE_TOKEN=abc\n")
    with pytest.raises(ConfigError) as err:
        refuse_exposed_lines([home])
    assert "\n" not in str(err.value) and f"{home}:2: MY_SERVICE_TOKEN" in str(err.value)


def test_the_sealed_file_is_0600_and_gives_every_byte_back(tmp_path):
    tricky = {"WANDB_API_KEY": "k\u00e9y$1", "WANDB_NOTES": "a $(x) `y` \"z\" \\ \n end "}
    path = write_sealed_env(tmp_path / "sealed", tricky)
    assert path.stat().st_mode & 0o777 == 0o600 and json.loads(path.read_text()) == tricky
    env = {SEALED_VAR: str(path), "WANDB_NOTES": "set already"}
    assert load_sealed_env(env) == ["WANDB_API_KEY", "WANDB_NOTES"]
    assert env["WANDB_API_KEY"] == tricky["WANDB_API_KEY"] and env["WANDB_NOTES"] == "set already"
    with pytest.raises(ConfigError, match=f"^{SEALED_VAR}: cannot read"):
        load_sealed_env({SEALED_VAR: str(tmp_path / "missing")})
    assert load_sealed_env({}) == []


def test_env_writes_the_block_and_the_sealed_file_and_names_what_to_unset(tmp_path, monkeypatch):
    from npt_ds.parallel.cluster import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_API_KEY", "sk-secret")
    monkeypatch.setenv("WANDB_PROJECT", "npt")
    target = tmp_path / ".deepspeed_env"
    assert main(["env", str(target)]) == 0
    block = target.read_text()
    assert "sk-secret" not in block and "WANDB_PROJECT=npt" in block and f"{SEALED_VAR}=" in block
    assert json.loads((tmp_path / ".npt_ds_sealed_env").read_text())["WANDB_API_KEY"] == "sk-secret"
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("WANDB_API_KEY=sk-old\n")
    assert main(["env", str(target)]) == 2  # refused: DeepSpeed's runner would read that line too
