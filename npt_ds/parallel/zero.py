"""ZeRO-3 and the frozen base: which ``deepspeed.frozen_base`` mode, its DeepSpeed settings, and gathered views of
partitioned parameters.

Under plain ZeRO-3 every rank all-gathers every frozen base weight on every forward, although the
base never changes.  ``deepspeed.frozen_base``:

* ``partitioned`` -- plain ZeRO-3: the base is partitioned and re-gathered every micro-batch.
* ``resident``    -- the base is whole on every rank and never enters ZeRO-3 (:mod:`npt_ds.train.build`): the
  engine holds only the trainable modules, which are ZeRO-3-*persistent* (``stage3_param_persistence_threshold``
  and ``stage3_model_persistence_threshold`` above the model size): gathered after each optimizer step, while
  gradients, optimizer state and fp32 masters stay partitioned.  Memory: the whole base on every rank, as ZeRO-2;
  no ZeRO-3 hooks or coordinator work on the frozen modules.  DeepSpeed's ``memory_efficient_linear`` is off:
  it replaces ``torch.nn.functional.linear`` process-wide (every frozen linear then runs through its autograd
  Function), which saves memory only while weights are partitioned (3.5 % slower fwd+bwd on CPU, demo shape).
  After each optimizer step DeepSpeed re-gathers the persistent parameters with one collective *per parameter*
  (three per NPT layer); :func:`coalesce_persistent_gather` makes that one flat all-gather, as ZeRO-2's.
  ``auto`` picks it when the planner says it fits.
* ``hpz``         -- ZeRO++ hierarchical partitioning (``zero_hpz_partition_size`` = GPUs per node): a
  secondary copy of the partitions within each node, so the re-gathers stay on the intra-node link.
* ``quantized``   -- ZeRO++ ``zero_quantized_nontrainable_weights``: the frozen weights are held and
  all-gathered as int8.  Needs DeepSpeed's CUDA quantizer kernels: refused on CPU with one line.

The 2-rank test ``tests/parallel/test_distributed.py::test_frozen_base_modes_give_the_same_losses`` checks the
losses of every mode against plain ZeRO-3 and the bytes each moves.
"""
from __future__ import annotations

import contextlib
import dataclasses


from ..config import ConfigError, TrainConfig
from ..planning.inputs import inputs_from_config
from ..planning.memory import plan_memory
from .topology import Topology

PERSIST_ALL = 10**15  # elements: above any model, so every parameter is persistent


def resolve_frozen_base(cfg: TrainConfig, topo: Topology, zero_stage: int, mem_gib: float, cuda: bool
                        ) -> tuple[str, str]:
    """-> (partitioned | resident | hpz | quantized, why) for `topo`'s nodes with `mem_gib` per rank; only ZeRO-3
    partitions parameters at all."""
    mode = cfg.deepspeed.frozen_base
    if zero_stage != 3:
        return "partitioned", f"ZeRO-{zero_stage} does not partition parameters (the base is resident anyway)"
    if mode == "quantized" and not cuda:
        raise ConfigError("deepspeed.frozen_base: quantized needs DeepSpeed's CUDA quantizer kernels; on this "
                          "CPU-only machine use resident, hpz or partitioned")
    if mode == "hpz" and topo.hpz_partition_size is None:
        raise ConfigError(f"deepspeed.frozen_base: hpz needs the same number of ranks on every node ({topo.source});"
                          " use partitioned, or start as many ranks on each node")
    if mode != "auto":
        return mode, "as configured"
    if cfg.model.quantization != "none":
        return "partitioned", "a bitsandbytes base is partitioned as loaded (see npt_ds.model.quant)"
    try:
        inputs = inputs_from_config(cfg, nodes=topo.nodes, gpus_per_node=topo.per_node, gpu_mem_gib=mem_gib,
                                    zero_stage=3)
    except ConfigError as exc:  # no config.json to plan from (e.g. a bare .gguf): stay on the safe side
        return "partitioned", f"the planner cannot read this model's shape ({exc})"
    resident = plan_memory(dataclasses.replace(inputs, frozen_base="resident"))
    if resident.fits:
        return "resident", f"the whole base fits on every rank ({resident.total / 2**30:.1f} of {mem_gib:.0f} GiB)"
    short = f"the base does not fit resident ({resident.total / 2**30:.1f} > {mem_gib:.0f} GiB)"
    if topo.nodes == 1:
        return "partitioned", f"{short}; on one node hpz's partition is plain ZeRO-3's"
    if topo.per_node == 1 or not topo.uniform:
        return "partitioned", f"{short}; hpz needs several ranks on every node and as many on each ({topo.source})"
    return "hpz", f"{short}; re-gathers stay within a node of {topo.per_node}"


def apply_frozen_base(ds: dict, mode: str, gpus_per_node: int) -> dict:
    """The zero_optimization settings of `mode` written into DeepSpeed config `ds` (in place; returned)."""
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3 or mode == "partitioned":
        return ds
    if mode == "resident":
        zero["stage3_param_persistence_threshold"] = PERSIST_ALL
        zero["stage3_model_persistence_threshold"] = PERSIST_ALL
        zero.setdefault("memory_efficient_linear", False)  # nothing is partitioned to save memory on
    elif mode == "hpz":
        zero["zero_hpz_partition_size"] = gpus_per_node
    elif mode == "quantized":
        zero["zero_quantized_nontrainable_weights"] = True
    return ds


def coalesce_persistent_gather(optimizer) -> int:
    """Re-gather a ZeRO-3 optimizer's persistent parameters after each step in one collective, not one per parameter.

    DeepSpeed 0.19's stage-3 ``step()`` (and its checkpoint-load epilogue) calls ``persistent_parameters[0]
    .all_gather(persistent_parameters)``, whose coalesced path still issues one all-gather per parameter: 45 for the
    upper half's NP weights, ~1 ms each on gloo.  The first parameter's ``all_gather`` is replaced by DeepSpeed's
    own flat-buffer gather (``all_gather_coalesced``, the one its forward fetch uses).  For ``resident`` only: there
    every persistent parameter is a trainable one of the primary partition (no hpz secondary copy).  -> the number
    of persistent parameters (0: nothing changed)."""
    params = list(getattr(optimizer, "persistent_parameters", None) or [])
    if len(params) < 2 or not hasattr(params[0], "all_gather_coalesced"):
        return 0
    first = params[0]

    def all_gather(param_list=None, async_op=False, hierarchy=0):
        todo = [p for p in (param_list or [first]) if p.ds_status.name == "NOT_AVAILABLE"]
        if todo:
            first.all_gather_coalesced(todo).wait()

    first.all_gather = all_gather
    return len(params)


def gathered(params):
    """Full tensors of (possibly ZeRO-3 partitioned) params inside the context."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # lazy: ZeRO-3 params (ds_id) exist only once deepspeed is loaded; plain models skip it

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
