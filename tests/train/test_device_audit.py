"""Device audit (no GPU needed): every code path a GPU run takes, with the model on `meta`, makes no host
tensor and mixes no devices.  See tests/support/device_audit.py for how `meta` stands in for CUDA."""
from __future__ import annotations

import importlib.util
import inspect
from types import SimpleNamespace

import pytest
import torch

from support.device_audit import DeviceAudit
from npt_ds.train import evaluate as evaluate_module
from npt_ds.config import LossConfig, NPTConfig
from npt_ds.parallel.groups import any_rank_flags
from npt_ds.train.evaluate import evaluate
from npt_ds.train.losses import NPTLoss
from npt_ds.model import convert_model, tiny_llama
from npt_ds.model.io import fold_context
from npt_ds.model.projector import LogitProjector
from npt_ds.train.module import NPTTrainModule, StepControls
from npt_ds.train.trainer import Trainer

META = torch.device("meta")
ALL_TERMS = LossConfig(fidelity_weight=1.0, fidelity_on="both", kd_weight=0.5, modulation_guidance=0.1,
                       orthogonality=0.1, projection_consistency=0.1, info_bottleneck=0.1, adaptive_weighting=True,
                       difficulty_mask=True, layerwise_scaling=True)


def meta_npt(**npt) -> torch.nn.Module:
    model = tiny_llama()
    convert_model(model, NPTConfig(layers="1,3", rank=4, **npt))
    return model.to(META)


def host_batches(n: int = 2) -> list[torch.Tensor]:
    """What eval_batches hands over: token windows on the host."""
    return [torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def audited(fn, *args, **kwargs):
    with DeviceAudit() as audit:
        result = fn(*args, **kwargs)
    assert not audit.violations, audit.report()
    return result


def test_evaluate_moves_host_batches_and_keeps_its_sums_on_the_device():
    result = audited(evaluate, meta_npt(), host_batches(), device=META)
    assert result["eval/tokens"] == 2 * 2 * 11 and "eval/layer/3/v_a_attn_sim" in result


def test_trainer_eval_hands_the_engine_device_to_evaluate():
    model = meta_npt()
    logged = []
    fake = SimpleNamespace(engine=SimpleNamespace(eval=lambda: None, train=lambda: None, device=META,
                                                  module=SimpleNamespace(model=model)),
                           eval_data=host_batches(), step=0, first_eval=None, reset_comm_window=lambda: None,
                           metrics=SimpleNamespace(log=logged.append, message=lambda text: None),
                           watchdog=SimpleNamespace(progress=lambda step, phase: None))
    audited(Trainer.run_eval, fake)
    assert logged and logged[0]["event"] == "eval"


def test_audit_catches_a_host_tensor_reintroduced_in_evaluate():
    """The defect this audit exists for: `torch.tensor(n)` summed with device tensors in evaluate."""
    source = inspect.getsource(evaluate_module)
    fixed = 'counts["tokens"] += ids[:, 1:].numel()'
    assert fixed in source
    spec = importlib.util.spec_from_loader("npt_ds.train._evaluate_regressed", loader=None)
    regressed = importlib.util.module_from_spec(spec)
    regressed.__package__ = "npt_ds.train"
    exec(compile(source.replace(fixed, 'add("tokens", torch.tensor(ids[:, 1:].numel()))'), "evaluate_regressed.py",
                 "exec"), regressed.__dict__)
    with pytest.raises(AssertionError, match=r"tensor\(\) makes a host tensor"):
        with DeviceAudit() as audit:
            regressed.evaluate(meta_npt(), host_batches(), device=META)
            assert not audit.violations, audit.report()


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_training_forward_and_backward_with_every_loss_term(ratio):
    model = meta_npt(dual=True, multiplicative=True)
    module = NPTTrainModule(model, NPTLoss(ALL_TERMS, 2))
    controls = StepControls(mixing_ratio=ratio, kd_weight=0.3, difficulty_keep=0.7, student_stream=True,
                            want_logits=True, diagnostics=True)

    def step():
        loss, comps = module(torch.randint(0, 256, (2, 12)).to(META), controls)
        nonfinite = (~torch.isfinite(loss.detach())).any().float()  # as Trainer.train_step: + the preemption flag
        bad, _preempted = any_rank_flags(torch.stack([nonfinite, nonfinite.new_full((), 0.0)]))
        finite = not bad
        module.loss_fn.finish_micro_batch(finite)
        loss.backward()
        return comps

    comps = audited(step)
    assert {"loss/kd", "loss/guidance/orthogonality", "weight/fidelity", "layer/3/v_a_attn_sim"} <= set(comps)
    assert all(p.grad is not None and p.grad.device == META for n, p in model.named_parameters() if ".np." in n)


def test_cross_width_teacher_forward():
    model = meta_npt()
    teacher = tiny_llama({"hidden_size": 96, "intermediate_size": 224}).to(META)
    module = NPTTrainModule(model, NPTLoss(LossConfig(kd_weight=1.0), 2), teacher, LogitProjector(96, 64).to(META))
    loss, comps = audited(module, torch.randint(0, 256, (2, 12)).to(META),
                          StepControls(kd_weight=1.0, student_stream=True, want_logits=True))
    assert "loss/projector_ce" in comps
    audited(loss.backward)


def test_fold_and_cached_decoding():
    """Folding a context, then a prefill + one cached decode step (what generation runs per token)."""
    from npt_ds.model import set_mode

    model = meta_npt()
    ids = torch.randint(0, 256, (1, 9)).to(META)
    audited(fold_context, model, ids, positions=[2, 5])
    set_mode(model, "student")

    def decode():
        prefill = model(input_ids=ids, use_cache=True)
        nxt = prefill.logits[:, -1:].argmax(-1)
        return model(input_ids=nxt, past_key_values=prefill.past_key_values, use_cache=True)

    out = audited(decode)
    assert out.logits.shape == (1, 1, 320) and out.past_key_values.get_seq_length() == 10


def test_each_rank_computes_on_its_own_gpu(monkeypatch):
    """Without set_device every rank's CUDA work (and bitsandbytes' quantising load) lands on cuda:0."""
    from npt_ds.parallel import groups as distributed
    from npt_ds.model import loading

    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.init_distributed() == (3, 4)
    assert picked == [1]
    assert loading.quantized_device_map() == {"device_map": {"": 1}}


def test_a_quantised_base_is_loaded_onto_this_ranks_gpu(monkeypatch):
    from transformers import AutoModelForCausalLM

    from npt_ds.config import ModelConfig
    from npt_ds.model.loading import load_base_model

    class Loaded(Exception):
        pass

    def from_pretrained(path, **kwargs):
        raise Loaded(kwargs.get("device_map"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Loaded) as got:
        load_base_model(ModelConfig(path="tiny", quantization="nf4"))
    assert got.value.args[0] == {"": 1}
