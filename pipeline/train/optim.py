"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pipeline.train.spec import TrainSpec


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine/linear decay to lr * min_lr_ratio at max_steps."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.decay == "constant":
        return spec.lr
    progress = (step - spec.warmup_steps) / max(1, spec.max_steps - spec.warmup_steps)
    progress = min(progress, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if spec.decay == "cosine" else 1 - progress
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, biases and embeddings do not. Frozen parameters are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, spec: TrainSpec, fused: bool) -> torch.optim.AdamW:
    """AdamW over param_groups; `fused` (one kernel for all tensors) where the device has it."""
    return torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=(spec.beta1, spec.beta2),
                             fused=fused)
