"""Which device this process computes on, and which 16-bit type that device does well.

Training (through Accelerate) and generation make the same choice from here.
"""

from __future__ import annotations

import torch


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def has_accelerator() -> bool:
    return best_device().type != "cpu"


def half_precision(device: torch.device) -> str | None:
    """'bf16' or 'fp16' where the device has fast 16-bit math, None on a CPU (where the answer
    depends on the CPU and is measured, not assumed)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return None


def resolve_mixed_precision(choice: str) -> str:
    """An explicit choice is obeyed; "auto" is bf16 (fp16 before Ampere) on a CUDA GPU, fp32 elsewhere."""
    if choice != "auto":
        return choice
    device = best_device()
    return (half_precision(device) if device.type == "cuda" else None) or "no"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, None: torch.float32}  # half_precision() -> dtype


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """For sums of losses and token counts: float64, except on Apple MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64
