"""Before training: how much memory each strategy needs, how long the budget takes, and the
largest micro-batch that fits.

Memory model (bytes), P parameters of which T trainable, N processes:
  weights fp32 4P, gradients 4T, AdamW moments 8T;
  DDP replicates all three, ZeRO-2 shards gradients + moments, FSDP/ZeRO-3 shard all three
  (plus one gathered layer at a time);
  activations per device ~ layers x tokens x d_model x 34 bytes in 16-bit (Korthikanti et al.
  2022, with SDPA/flash so no s^2 term; x2 in fp32), plus logits: tokens x vocab x 10 bytes
  (16-bit logits, their fp32 copy for the loss, and its gradient). Activation checkpointing
  keeps one layer input per recomputed layer (2 bytes x d_model per token) and one layer's full set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeline.model.build import count_params

log = logging.getLogger("pipeline")
GB = 1e9


def activation_bytes(n_layer: int, d_model: int, vocab: int, tokens: int, half: bool, checkpointing: float) -> float:
    """`checkpointing`: the share of layers whose activations are recomputed (True: all)."""
    per_layer = 34 * d_model * tokens * (1 if half else 2)
    kept = n_layer * per_layer * (1 - checkpointing)
    recomputed = n_layer * checkpointing * 2 * d_model * tokens + (per_layer if checkpointing else 0)
    return kept + recomputed + 10 * vocab * tokens


def memory_table(params: int, trainable: int, n_layer: int, world: int, act: float) -> dict[str, float]:
    """Estimated bytes per device for each strategy."""
    w, g, o = 4 * params, 4 * trainable, 8 * trainable
    return {
        "ddp": w + g + o + act,
        "zero2": w + (g + o) / world + act,
        "fsdp/zero3": (w + g + o) / world + w / max(n_layer, 1) + act,
    }


def preflight_lines(
    *,
    params: int,
    trainable: int,
    flops_per_token: float | None,
    n_layer: int,
    d_model: int,
    vocab: int,
    micro_tokens: int,
    world: int,
    half: bool,
    checkpointing: float,
    budget_tokens: int | None,
    peak_flops: float | None,
    mfu: float = 0.4,
) -> list[str]:
    """Lines to log before training starts (keyword arguments only: they are easy to mix up)."""
    act = activation_bytes(n_layer, d_model, vocab, micro_tokens, half, checkpointing)
    table = memory_table(params, trainable, n_layer, world, act)
    lines = [
        f"pre-flight: {params / 1e6:.1f}M params ({trainable / 1e6:.1f}M trainable), "
        + (f"{flops_per_token / 1e6:.1f} MFLOPs/token, " if flops_per_token else "")
        + f"weights {4 * params / GB:.2f} GB, grads {4 * trainable / GB:.2f} GB, AdamW {8 * trainable / GB:.2f} GB, "
        f"activations {act / GB:.2f} GB per micro-batch of {micro_tokens} tokens",
        "pre-flight: per-device memory "
        + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in table.items())
        + f" (x{world} processes)",
    ]
    if peak_flops and flops_per_token and budget_tokens:  # None: a time budget decides the tokens
        seconds = budget_tokens * flops_per_token / (mfu * peak_flops * world)
        lines.append(f"pre-flight: {budget_tokens / 1e6:.1f}M tokens take ~{seconds / 3600:.3g} h at {mfu:.0%} MFU")
    return lines


def log_preflight(
    model,
    config,
    flops_per_token: float | None,
    spec,
    micro: int,
    world: int,
    precision: str,
    peak_flops: float | None,
    recomputed: float,
) -> None:
    """Log the pre-flight lines of a prepared model (`config`: the unwrapped model's; `recomputed`:
    the share of its layers whose activations are recomputed)."""
    for line in preflight_lines(
        params=count_params(model),
        trainable=count_params(model, trainable_only=True),
        flops_per_token=flops_per_token,
        n_layer=getattr(config, "num_hidden_layers", 1),
        d_model=getattr(config, "hidden_size", 1),
        vocab=getattr(config, "vocab_size", 1),
        micro_tokens=micro * spec.seq_len,
        world=world,
        half=precision in ("bf16", "fp16"),
        checkpointing=recomputed,
        budget_tokens=None if spec.time_budget else spec.max_steps * spec.batch_tokens,
        peak_flops=peak_flops,
    ):
        log.info(line)


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def find_micro_batch(per_rank: int, probe: Callable[[int], None], cap: int | None = None) -> int:
    """The largest divisor of `per_rank` (at most `cap`) for which `probe(size)` runs without
    running out of memory, trying divisors from large to small; each OOM frees the CUDA cache."""
    for size in divisors_desc(per_rank):
        if cap is not None and size > cap:
            continue
        try:
            probe(size)
            return size
        except torch.OutOfMemoryError:
            log.info("micro-batch %d does not fit; trying smaller", size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise torch.OutOfMemoryError("not even a micro-batch of 1 sequence fits; use FSDP/ZeRO-3 or a smaller model")
