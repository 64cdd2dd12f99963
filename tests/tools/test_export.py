"""Export: the HF dir loads with trust_remote_code in a process where npt_ds cannot be imported, its logits equal
npt-ds's own forward (fp32, 1e-5, injected deltas included) and generate() works."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from npt_ds.cli import main
from npt_ds.model import ByteTokenizer, inject, save_np_weights
from npt_ds.tools.generate import DecodeOptions, generate_ids
from npt_ds.tools.session import load_npt

from support.npt import strong_npt

CHILD = r"""
import json, sys
sys.modules["npt_ds"] = None  # the venv's editable install would find it otherwise
try:
    import npt_ds
except ImportError:
    pass
else:
    raise SystemExit("npt_ds is importable in the child")
import torch
from transformers import AutoModelForCausalLM
hf_dir, ids_json, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.tensor(json.loads(ids_json))
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, out)
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
print(json.dumps({"class": type(model).__name__, "tokens": gen[0, ids.shape[1]:].tolist(),
                  "modules": sorted(m for m in sys.modules if m.startswith("npt"))}))
"""


def test_export_round_trip_loads_without_npt_ds(tmp_path):
    model = strong_npt(dual=True, down_bias=True).float()
    inject(model, torch.tensor([list(b"The sky is green.")]), {"context": "The sky is green."}, alpha=1.5)
    np_dir, hf_dir = tmp_path / "np", tmp_path / "hf"
    save_np_weights(model, np_dir)
    assert main(["export", "--model", "tiny", "--np", str(np_dir), "--out", str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_npt.NPTLlamaForCausalLM"
    assert config["npt_layers"] == [1, 3] and config["npt_dual"] is True and config["npt_down_bias"] is True
    assert "The sky is green." in (hf_dir / "README.md").read_text()
    template = (hf_dir / "modeling_npt.py").read_text()
    assert "npt_ds" not in template.replace("npt-ds export", "")

    ours, tok, _ = load_npt(str(np_dir), "tiny")  # the saved deltas come back through load_np_weights
    ids = torch.tensor([list(b"To be, or not to be")])
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    torch.testing.assert_close(want, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    want_tokens = generate_ids(ours, ByteTokenizer(), ids, DecodeOptions(max_new_tokens=8))[0].tolist()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(hf_dir), json.dumps(ids.tolist()),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"] == "NPTLlamaForCausalLM" and result["modules"] == ["npt_ds"]  # the None stub only
    got = torch.load(tmp_path / "logits.pt")
    assert (want - strong_npt(dual=True, down_bias=True).float()(input_ids=ids).logits).abs().max() > 1e-3  # injection is in there
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert result["tokens"] == want_tokens
