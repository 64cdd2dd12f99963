"""What this hardware computes: ``precision: auto``, the device's bf16 peak (for MFU) and its memory.

``deepspeed.precision: auto`` is bf16 on a CUDA device that supports it and on a CPU with bf16 units
(AMX tiles or AVX512-BF16), fp32 otherwise: on an AVX-512 CPU without them a bf16 matmul runs at a
fifth of fp32's speed (61 vs 283 GFLOP/s, 2048², measured on such a machine), while with AVX512-BF16
it runs at 2.7x fp32's (199 vs 74 GFLOP/s, 1024², one thread, measured on this project's CI machine).
"""
from __future__ import annotations

import os
import re

import torch


# dense bf16 tensor-core peak, TFLOP/s, by a model name in torch.cuda.get_device_name() (first match wins; matched
# as whole words, so "L4" is not found inside "NVIDIA L40S" nor "A10" inside "A100")
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0))


# GPUs without bf16 (before Ampere), by a whole word of the device name; every later NVIDIA GPU computes bf16
NO_BF16 = re.compile(r"\b(V100|T4|P100|P40|P4|K80|M60|Titan V|Quadro RTX|RTX 20\d0)\b", re.IGNORECASE)


def resolve_precision(requested: str, gpu_name: str | None = None) -> tuple[str, str]:
    """-> (fp32 | bf16 | fp16, why); `gpu_name`: a GPU named on the command line instead of this machine's."""
    if requested != "auto":
        return requested, "as configured"
    if gpu_name is not None:
        if NO_BF16.search(gpu_name):
            return "fp32", f"{gpu_name} has no bf16"
        return "bf16", f"{gpu_name} computes bf16 (as every NVIDIA GPU since Ampere)"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {torch.cuda.get_device_name()} computes bf16"
        return "fp32", "this CUDA device has no bf16"
    if _cpu_has("_is_amx_tile_supported"):
        return "bf16", "CPU with AMX tiles"
    if _cpu_has("_is_avx512_bf16_supported"):
        return "bf16", "CPU with AVX512-BF16"
    return "fp32", "CPU without bf16 units: bf16 matmuls are several times slower than fp32 here"


def _cpu_has(probe: str) -> bool:
    return bool(getattr(torch.cpu, probe, lambda: False)())


def peak_tflops(configured: float = 0.0, device_name: str | None = None) -> tuple[float | None, str]:
    """-> (peak TFLOP/s per device or None, where it comes from): ``perf.peak_tflops`` when > 0, else the
    CUDA device's dense bf16 peak from :data:`BF16_PEAK_TFLOPS`; None on CPU or an unknown GPU."""
    if configured > 0:
        return configured, "perf.peak_tflops"
    if device_name is None:
        if not torch.cuda.is_available():
            return None, "no peak known for a CPU; set perf.peak_tflops for an MFU"
        device_name = torch.cuda.get_device_name()
    for fragment, peak in BF16_PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(fragment)}(?![A-Za-z0-9])", device_name):
            return peak, f"{device_name} bf16 dense"
    return None, f"no peak known for {device_name}; set perf.peak_tflops for an MFU"


def device_memory_gib(ranks_per_node: int) -> float:
    """Memory one rank may use: its GPU's, or this machine's RAM shared by the ranks on it."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * size / 2**30 / max(1, ranks_per_node)
