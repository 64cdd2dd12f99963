"""ZeRO-3 with a resident frozen base: gathered once, never released or re-gathered.

DeepSpeed's parameter persistence alone does not do it: ZeRO-3's optimizer step releases *every*
parameter (``partition_all_parameters``) and re-gathers the persistent ones after the step, so a
persistent base is still all-gathered once per optimizer step (measured: 0.54 GB/step on SmolLM2 in
fp32, the whole model).  A frozen weight never changes, so there is nothing to re-partition.
:func:`keep_frozen_resident` narrows both to the trainable parameters on a built engine:

* the coordinator's release (after a module's forward/backward, and the step's "release all") skips
  frozen persistent parameters: they stay AVAILABLE (while recording its trace, ZeRO-3 would otherwise
  release even persistent ones after each module);
* the post-step re-gather list holds only trainable persistent parameters.

Gradients, optimizer state and the trainable parameters' fp32 masters stay partitioned as before.
This reaches into DeepSpeed 0.19.8's ZeRO-3 internals (pinned in pyproject.toml); the 2-rank test
``tests/test_distributed.py::test_frozen_base_modes_give_the_same_losses`` checks the losses against plain
ZeRO-3 and the bytes moved.
"""
from __future__ import annotations

from torch import nn


def keep_frozen_resident(engine) -> int:
    """Patch a ZeRO-3 engine built with every parameter persistent; -> number of resident frozen params."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    opt = engine.optimizer
    offload = opt.parameter_offload
    module: nn.Module = offload.module
    coordinator = offload.get_param_coordinator()
    release = coordinator._PartitionedParameterCoordinator__release_param
    inflight = coordinator._PartitionedParameterCoordinator__inflight_param_registry
    resident = [p for p in module.parameters() if not p.requires_grad and getattr(p, "ds_persist", False)]
    keep = {id(p) for p in resident}

    def partition_all_but_resident() -> None:
        for param in module.parameters():
            if id(param) in keep:
                continue
            if param in inflight:
                inflight.pop(param).wait()
            param.ds_active_sub_modules.clear()
            release(param)
        for param in module.parameters():
            if id(param) not in keep and param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                raise RuntimeError(f"{param.ds_summary()} expected to be released")

    def release_unless_resident(param, free_data: bool = True) -> None:
        if id(param) not in keep:
            release(param, free_data)

    # every release path (after a module's forward or backward -- while ZeRO-3 records its trace it releases
    # persistent parameters too -- and the step's "release all") goes through this one method
    coordinator._PartitionedParameterCoordinator__release_param = release_unless_resident
    offload.partition_all_parameters = partition_all_but_resident
    opt.persistent_parameters = [p for p in opt.persistent_parameters if id(p) not in keep]
    if resident:  # gather them now, once
        resident[0].all_gather(resident)
    return len(resident)
