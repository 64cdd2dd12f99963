"""A device audit for CPU-only CI: run a code path with its model on PyTorch's `meta` device and fail on
anything a GPU run would trip over.

On CUDA, a tensor made on the host and mixed with device tensors crashes (or silently copies every
step); on a CPU-only machine both live on the CPU and nothing shows.  `meta` behaves like an
accelerator here: ops refuse to mix meta and CPU tensors, as CUDA ops refuse CPU ones.  Under
:class:`DeviceAudit`

* an op whose tensor arguments sit on more than one device is reported (0-dim CPU scalars included,
  which CUDA tolerates in some ops but not in ``stack``/``cat``);
* a tensor factory (``torch.tensor``, ``zeros``, ``arange``, ...) called from npt_ds code without a
  device, or with the CPU, is reported: on a GPU run it would be a host tensor;
* host reads of meta tensors (``.item()``, ``.tolist()``, ``float()``, ``bool()``) answer 1 so the path
  runs to its end (meta tensors hold no values); the values mean nothing, only the devices are audited.

Usage::

    with DeviceAudit() as audit:
        evaluate(meta_model, cpu_batches, device="meta")
    assert not audit.violations, audit.report()
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace, torch.scalar_tensor}
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__bool__, torch.Tensor.__index__}
AUDITED_PACKAGES = ("npt_ds",)


def _caller_module() -> str:
    """Module of the first frame outside torch and this file (who called the op)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("torch") or name == __name__):
            return name
        frame = frame.f_back
    return ""


def _where(packages: tuple[str, ...]) -> str:
    """file:line of the innermost audited frame on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(packages):
            return f"{'/'.join(frame.f_code.co_filename.rsplit('/', 2)[-2:])}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside " + "/".join(packages)


def _meta_answer(func, tensor: torch.Tensor):
    if func is torch.Tensor.tolist:
        return torch.ones(tensor.shape, device="cpu").tolist()
    if func is torch.Tensor.__bool__:
        return True
    if func in (torch.Tensor.__int__, torch.Tensor.__index__):
        return 1
    return 1.0


class DeviceAudit(TorchFunctionMode):
    def __init__(self, packages: Iterable[str] = AUDITED_PACKAGES):
        super().__init__()
        self.packages = tuple(packages)
        self.violations: list[str] = []
        self._generator = torch.Generator

    def __enter__(self):
        real = self._generator

        def generator(device=None):  # meta has no generators; CUDA does: hand out a CPU one, dropped below
            return real() if device is not None and torch.device(device).type == "meta" else real(device)

        torch.Generator = generator
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Generator = self._generator
        return super().__exit__(*exc)

    def report(self) -> str:
        return "\n".join(dict.fromkeys(self.violations))  # unique, in order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            return _meta_answer(func, args[0])
        if func in FACTORIES and _caller_module().startswith(self.packages):
            device = kwargs.get("device")
            if device is None or torch.device(device).type == "cpu":
                self.violations.append(f"{func.__name__}() makes a host tensor at {_where(self.packages)}")
        gen = kwargs.get("generator")
        if gen is not None and gen.device.type == "cpu" and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "meta":
            kwargs = {k: v for k, v in kwargs.items() if k != "generator"}  # see __enter__
        leaves, _ = tree_flatten((args, kwargs))
        devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor)}
        if len(devices) > 1 and func not in (torch.Tensor.to, torch.Tensor.copy_):
            self.violations.append(f"{getattr(func, '__name__', func)} mixes devices {sorted(devices)} at {_where(self.packages)}")
        try:
            return func(*args, **kwargs)
        except RuntimeError as exc:  # the mismatch itself, on an accelerator-like device: report what caused it
            if self.violations:
                raise AssertionError(f"{exc}\n{self.report()}") from exc
            raise
