"""CUDA against CPU fp32: cached decoding and generate, the export round trip, injection.

Decoding on the device in fp32 must give the CPU's greedy tokens with and without the KV cache.  In bf16 a cached
decode step's logits agree with the uncached forward's on the device within 1 % (relative, over the vocabulary),
and the logits agree with fp32 CPU within 10 %: this test model's NP weights (std 0.3, tests/support/npt.py) amplify
rounding, 4.8 % on a bf16 CPU.  The exported HF dir loaded on the device in bf16 gives npt-ds's fp32 logits within
10 % and generates.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support.cuda import on, rel_err
from npt_ds.model import ByteTokenizer, inject, save_np_weights
from npt_ds.tools.export import export
from npt_ds.tools.generate import DecodeOptions, generate_ids

from support.npt import strong_npt

pytestmark = pytest.mark.cuda
PROMPT = torch.tensor([list(b"To be, or not to be")])


def test_cached_decoding_and_generate_on_cuda(cuda_device):
    model = strong_npt(dual=True).float()
    opts = DecodeOptions(max_new_tokens=12)
    want = generate_ids(model, ByteTokenizer(), PROMPT, opts)
    device_model = on(model, cuda_device, torch.float32)
    for use_cache in (True, False):
        got = generate_ids(device_model, ByteTokenizer(), PROMPT.to(cuda_device),
                           DecodeOptions(max_new_tokens=12, use_cache=use_cache))
        assert got.cpu().tolist() == want.tolist(), use_cache
    bf16 = on(model, cuda_device, torch.bfloat16)
    ids = torch.cat([PROMPT, want[:, :1]], dim=1)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        uncached = bf16(input_ids=ids.to(cuda_device)).logits
        prefill = bf16(input_ids=PROMPT.to(cuda_device), use_cache=True)
        step = bf16(input_ids=want[:, :1].to(cuda_device), past_key_values=prefill.past_key_values, use_cache=True)
    assert rel_err(step.logits[:, -1], uncached[:, -1]) < 0.01
    assert rel_err(prefill.logits, full[:, :-1]) < 0.1 and rel_err(step.logits[:, -1], full[:, -1]) < 0.1
    sampled = generate_ids(bf16, ByteTokenizer(), PROMPT.to(cuda_device),
                           DecodeOptions(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1))
    assert sampled.shape == (1, 8) and sampled.device.type == cuda_device.type


def test_export_round_trip_on_cuda(cuda_device, tmp_path):
    model = strong_npt(dual=True, down_bias=True).float()
    inject(model, torch.tensor([list(b"The sky is green.")]), {"context": "The sky is green."}, alpha=1.5)
    save_np_weights(model, tmp_path / "np")
    hf = export(model, ByteTokenizer(), tmp_path / "hf", base="tiny", np_dir=str(tmp_path / "np"))
    loaded = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True, dtype=torch.bfloat16)
    loaded = loaded.to(cuda_device).eval()
    with torch.no_grad():
        want = model(input_ids=PROMPT).logits
        got = loaded(input_ids=PROMPT.to(cuda_device)).logits
    assert rel_err(got, want) < 0.1
    out = loaded.generate(input_ids=PROMPT.to(cuda_device), attention_mask=torch.ones_like(PROMPT).to(cuda_device),
                          max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, PROMPT.shape[1] + 6)


def test_inject_on_cuda(cuda_device):
    model = strong_npt(dual=True).float()
    device_model = on(model, cuda_device, torch.float32)
    context = torch.tensor([list(b"The sky is green.")])
    want = inject(model, context, {"context": "sky"}, positions="mean", alpha=0.5)
    got = inject(device_model, context.to(cuda_device), {"context": "sky"}, positions="mean", alpha=0.5)
    for name, delta in want.items():
        assert rel_err(got[name], delta) < 1e-4, name  # fp32 on both: summation order only
    with torch.no_grad():
        assert rel_err(device_model(input_ids=PROMPT.to(cuda_device)).logits, model(input_ids=PROMPT).logits) < 1e-4
