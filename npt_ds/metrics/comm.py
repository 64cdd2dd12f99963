"""Bytes moved by DeepSpeed's collectives on this rank, by kind, counted without any sync.

A thin wrapper around the methods of `deepspeed.comm`'s backend object (every ZeRO all-gather,
reduce-scatter and all-reduce goes through it).  What is counted per call is the message size the way
DeepSpeed's comms logger counts it: the full gathered tensor of an all-gather, the full input of a
reduce-scatter, the tensor of an all-reduce or broadcast.  On the wire a ring moves (n-1)/n of that per
rank.  Kinds: ``gather`` (parameter all-gathers), ``reduce`` (gradient reduce-scatter / all-reduce),
``other`` (broadcasts and the rest).

The same wrapper clocks the time this rank is blocked in them (the call itself and, for an async call,
the returned handle's ``wait``) into :data:`npt_ds.parallel.groups.WAIT` (on CUDA also the compute stream's
wait, by events): a rank's own step time is its wall (or stream) time less that.
"""
from __future__ import annotations

import functools

import deepspeed.comm.comm as ds_comm
import torch

from ..parallel.groups import WAIT

KINDS = {
    "all_gather_into_tensor": "gather", "all_gather_base": "gather", "all_gather": "gather",
    "all_gather_coalesced": "gather",
    "reduce_scatter_tensor": "reduce", "reduce_scatter": "reduce", "all_reduce": "reduce",
    "all_reduce_coalesced": "reduce", "reduce": "reduce",
    "broadcast": "other", "all_to_all_single": "other",
}
# where the message is: (position, keyword); default the first argument
MESSAGE_ARG = {
    "all_gather_into_tensor": (0, "output_tensor"), "all_gather_base": (0, "output_tensor"),
    "all_gather": (0, "tensor_list"), "all_gather_coalesced": (0, "output_tensors"),
    "reduce_scatter_tensor": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
    "all_reduce": (0, "tensor"), "all_reduce_coalesced": (0, "tensors"), "reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
}


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class _TimedHandle:
    """An async collective's handle whose `wait` is clocked into WAIT; everything else is the handle's."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def wait(self, *args, **kwargs):
        return WAIT.timed(self._handle.wait, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._handle, name)


class CommCounter:
    """Cumulative bytes and calls per kind since install; `totals()` is a snapshot (host integers, no device sync)."""

    def __init__(self) -> None:
        self.bytes = {"gather": 0, "reduce": 0, "other": 0}
        self.calls = {"gather": 0, "reduce": 0, "other": 0}
        self._backend = None

    def install(self) -> "CommCounter":
        """Wrap the collectives of the initialised deepspeed.comm backend (idempotent per backend)."""
        backend = ds_comm.cdb
        if backend is None or self._backend is backend:
            return self
        for name, kind in KINDS.items():
            method = getattr(backend, name, None)
            if method is None or getattr(method, "_npt_counted", False):
                continue
            setattr(backend, name, self._wrap(method, name, kind))
        self._backend = backend
        return self

    def _wrap(self, method, name: str, kind: str):
        counter = self
        position, keyword = MESSAGE_ARG.get(name, (0, None))

        @functools.wraps(method)
        def counted(*args, **kwargs):
            if keyword in kwargs:
                payload = kwargs[keyword]
            elif len(args) > position:
                payload = args[position]
            else:
                payload = next(iter(kwargs.values()), None)
            counter.bytes[kind] += _nbytes(payload)
            counter.calls[kind] += 1
            result = WAIT.timed(method, *args, **kwargs)
            return _TimedHandle(result) if hasattr(result, "wait") else result

        counted._npt_counted = True
        return counted

    def totals(self) -> dict[str, int]:
        """{kind: bytes, kind_calls: calls} for every kind."""
        return {**self.bytes, **{f"{kind}_calls": n for kind, n in self.calls.items()}}


COUNTER = CommCounter()
