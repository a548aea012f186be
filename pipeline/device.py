"""Which device this process computes on, and which 16-bit type that device does well.

Training (through Accelerate) and generation make the same choice from here. On a CPU the answer
depends on the CPU (native bf16 on AVX-512-bf16 and AMX, a slow emulation on AVX2), so it is
screened by timing the model's own matmul shapes in milliseconds before anything runs at full size.
"""

from __future__ import annotations

import statistics
import time

import torch

SCREEN_SECONDS = 0.25  # the most one dtype's matmul screen may take (a slow dtype stops after one round)
SCREEN_TOKENS = 32  # rows of the screen's matmuls: milliseconds even where bf16 is emulated
SCREEN_SLOWER = 1.5  # a dtype whose screen is this much slower than fp32's is not run at full size


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


def matmul_ms(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device) -> float:
    """Milliseconds of one round of (m x k) @ (k x n) products, one per shape, in `dtype`: the
    median of up to 3 rounds after a warm-up round, stopping early once SCREEN_SECONDS have passed
    (a dtype 20x slower costs one or two rounds, not a full-size pass)."""
    gen = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(m, k, generator=gen).to(device, dtype), torch.randn(k, n, generator=gen).to(device, dtype))
        for m, k, n in shapes
    ]
    start, rounds = time.perf_counter(), []
    for _ in range(4):
        t0 = time.perf_counter()
        for a, b in pairs:
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rounds.append(1000 * (time.perf_counter() - t0))
        if time.perf_counter() - start > SCREEN_SECONDS:
            break
    return statistics.median(rounds[1:] or rounds)


def bf16_speedup(shapes: list[tuple[int, int, int]], device: torch.device) -> float:
    """How many times faster bf16 matmuls of these shapes run than fp32 here (below 1: slower)."""
    return matmul_ms(shapes, torch.float32, device) / matmul_ms(shapes, torch.bfloat16, device)


def model_matmul_shapes(config, tokens: int = SCREEN_TOKENS) -> list[tuple[int, int, int]]:
    """(m, k, n) of a block's MLP matmuls and the output head, for SCREEN_TOKENS positions."""
    d = config.hidden_size
    ff = getattr(config, "intermediate_size", None) or 4 * d
    return [(tokens, d, ff), (tokens, ff, d), (tokens, d, config.vocab_size)]
