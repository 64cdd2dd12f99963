"""The device peak table is matched by whole model names (an "L4" is not an "L40")."""
from __future__ import annotations

import pytest

from npt_ds.parallel.devices import peak_tflops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L4", 121.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A40", None), ("NVIDIA L400X", None),
])
def test_each_device_gets_its_own_peak(name, peak):
    assert peak_tflops(0.0, name)[0] == peak
