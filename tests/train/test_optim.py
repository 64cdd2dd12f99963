"""Parameter groups: coverage, first-match-wins, no-decay split, set_lr, and acceptance by DeepSpeed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from npt_ds.config import OptimConfig
from npt_ds.train.optim import build_param_groups, set_lr

REPO = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 4)
        self.np = nn.Module()
        self.np.W_down = nn.Parameter(torch.zeros(4, 2))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.router = nn.Linear(4, 2)
        self.logit_projector = nn.Linear(6, 4)
        self.embed.requires_grad_(False)
        self.layers[0].mlp.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers[1].mlp(self.embed(x)) + self.layers[1].np.W_down.sum()
        return self.router(self.layers[1].norm(h)).pow(2).mean()


def config() -> OptimConfig:
    return OptimConfig(lr=1e-3, weight_decay=0.1, param_groups=[
        {"pattern": "*logit_projector*", "lr_mult": 5.0},
        {"pattern": "*router*", "lr_mult": 2.0, "weight_decay": 0.01},
        {"pattern": "*.np.*", "lr_mult": 1.0},
        {"pattern": "layers.1.*", "lr_mult": 0.5},  # layers.1.np.W_down matched "*.np.*" first
    ])


def test_every_trainable_param_in_exactly_one_group():
    model = Tiny()
    groups = build_param_groups(model, config())
    names = {id(p): n for n, p in model.named_parameters()}
    placed = {names[id(p)]: g["name"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(placed)
    assert set(placed) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert placed == {
        "logit_projector.weight": "*logit_projector*", "logit_projector.bias": "*logit_projector*/no_decay",
        "router.weight": "*router*", "router.bias": "*router*/no_decay",
        "layers.0.np.W_down": "*.np.*", "layers.1.np.W_down": "*.np.*",
        "layers.1.mlp.weight": "layers.1.*", "layers.1.mlp.bias": "layers.1.*/no_decay",
        "layers.0.norm.weight": "default/no_decay", "layers.0.norm.bias": "default/no_decay",
        "layers.1.norm.weight": "layers.1.*/no_decay", "layers.1.norm.bias": "layers.1.*/no_decay",
    }
    table = {g["name"]: (g["lr"], g["weight_decay"], g["lr_mult"]) for g in groups}
    assert table == {
        "*logit_projector*": (pytest.approx(5e-3), 0.1, 5.0),
        "*logit_projector*/no_decay": (pytest.approx(5e-3), 0.0, 5.0),
        "*router*": (pytest.approx(2e-3), 0.01, 2.0), "*router*/no_decay": (pytest.approx(2e-3), 0.0, 2.0),
        "*.np.*": (pytest.approx(1e-3), 0.1, 1.0),
        "layers.1.*": (pytest.approx(5e-4), 0.1, 0.5), "layers.1.*/no_decay": (pytest.approx(5e-4), 0.0, 0.5),
        "default/no_decay": (pytest.approx(1e-3), 0.0, 1.0),
    }
    assert [g["name"] for g in groups][:2] == ["*logit_projector*", "*logit_projector*/no_decay"]


def test_set_lr_applies_multipliers():
    opt = torch.optim.AdamW(build_param_groups(Tiny(), config()))
    set_lr(opt, 2e-4)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["*logit_projector*"] == pytest.approx(1e-3)
    assert all(g["lr"] == pytest.approx(2e-4 * g["lr_mult"]) for g in opt.param_groups)


DS_SCRIPT = """
import json, sys, torch, deepspeed
sys.path.insert(0, {repo!r})
from tests.train.test_optim import Tiny, config
from npt_ds.train.optim import build_param_groups, set_lr
deepspeed.init_distributed(dist_backend="gloo")
model = Tiny()
ds_config = {{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "optimizer": {{"type": "Adam", "params": {{"lr": 1e-3, "torch_adam": True}}}},
             "zero_optimization": {{"stage": 2}}}}
engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=build_param_groups(model, config()),
                                               config=ds_config)
before = {{g["name"]: g["lr"] for g in optimizer.param_groups}}
loss = engine(torch.tensor([[1, 2, 3]]))
engine.backward(loss)
engine.step()
set_lr(optimizer, 2e-4)
after = {{g["name"]: g["lr"] for g in optimizer.param_groups}}
print("RESULT" + json.dumps({{"before": before, "after": after, "type": type(optimizer).__name__}}))
"""


def test_deepspeed_accepts_groups(tmp_path, free_port):
    """One-process ZeRO-2 fp32 run in a subprocess, so no process group leaks into other tests."""
    script = tmp_path / "ds_groups.py"
    script.write_text(DS_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT"):])
    expected = {g["name"]: g["lr"] for g in build_param_groups(Tiny(), config())}
    assert result["before"] == pytest.approx(expected)
    assert result["after"] == pytest.approx({name: 2e-4 * lr / 1e-3 for name, lr in expected.items()})


def first_update_over_lr(reset: bool, idle_steps: int) -> float:
    """Two layers in one AdamW; layer B idles (LR 0, zero grads, as ZeRO gives it) and then trains: max |Δw| / LR."""
    from npt_ds.train.optim import reset_optimizer_state

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(64)), nn.Parameter(torch.randn(64))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-3, weight_decay=0.0)
    for _ in range(idle_steps):
        opt.param_groups[1]["lr"] = 0.0
        a.grad, b.grad = torch.randn(64), torch.zeros(64)
        opt.step()
    if reset:
        reset_optimizer_state(opt, [1])
    opt.param_groups[1]["lr"] = 1e-3
    before = b.detach().clone()
    a.grad, b.grad = torch.randn(64), torch.randn(64)
    opt.step()
    return ((b.detach() - before).abs().max() / 1e-3).item()


def test_a_layer_that_idled_gets_a_first_adam_update_of_its_lr_after_a_reset():
    """The review's repro: after 1000 idle steps the first update of a layer was 2.5-5x its LR."""
    stale = first_update_over_lr(reset=False, idle_steps=1000)
    assert 2.5 < stale < 5.5, stale
    assert first_update_over_lr(reset=True, idle_steps=1000) == pytest.approx(1.0, abs=1e-3)
    assert first_update_over_lr(reset=True, idle_steps=0) == pytest.approx(1.0, abs=1e-3)
