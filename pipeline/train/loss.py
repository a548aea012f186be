"""The training objective: per-token next-token cross entropy, with IGNORE marking untrained labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a token that is not trained (prompt, padding); torch's and transformers' convention
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def token_losses(model, batch: dict) -> torch.Tensor:
    """Per-token cross entropy in fp32 (0 where labels are IGNORE)."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    logits = model(**inputs, use_cache=False).logits  # no cache: packed position ids then split attention
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(batch["labels"])
