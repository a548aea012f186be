"""Model FLOPs utilisation: the peak FLOP/s of known devices, and MFU from tokens/s."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak FLOP/s by device name substring (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float | None, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved / peak FLOP/s over all devices, or None when either side is unknown."""
    if not (flops_per_token and peak):
        return None
    return flops_per_token * tokens_per_s / (peak * devices)
