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
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


# Dense fp32 peak FLOP/s without tensor cores (what fp32 matmuls use unless TF32 is allowed).
PEAK_FP32_FLOPS = {
    "H200": 67e12,
    "H100 SXM": 67e12,
    "H100 NVL": 60e12,
    "H100 PCIe": 51e12,
    "H100": 67e12,
    "GH200": 67e12,
    "A100": 19.5e12,
    "A10G": 31.2e12,
    "A10": 31.2e12,
    "L40S": 91.6e12,
    "L40": 90.5e12,
    "L4": 30.3e12,
    "RTX 4090": 82.6e12,
    "RTX 3090": 35.6e12,
    "V100": 15.7e12,
}


def _lookup(table: dict, name: str) -> float | None:
    return next((flops for key, flops in table.items() if key in name), None)


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of one device for the precision in use ("bf16", "fp16" or "no" = fp32, where
    TF32 tensor cores count at half the bf16 peak if torch allows them), or None where unknown
    (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if precision in ("bf16", "fp16"):
        return _lookup(PEAK_BF16_FLOPS, name)
    tf32 = torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and later
    if tf32 and torch.get_float32_matmul_precision() != "highest":  # TF32 allowed (also via allow_tf32)
        half = _lookup(PEAK_BF16_FLOPS, name)
        return half / 2 if half else None
    return _lookup(PEAK_FP32_FLOPS, name)


def mfu(flops_per_token: float | None, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved / peak FLOP/s over all devices, or None when either side is unknown."""
    if not (flops_per_token and peak):
        return None
    return flops_per_token * tokens_per_s / (peak * devices)
