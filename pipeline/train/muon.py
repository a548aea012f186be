"""Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) with its Newton-Schulz
iterations in a chosen dtype.

torch.optim.Muon always orthogonalises in bf16. That is fast on GPUs and on CPUs with native bf16
(AVX-512-bf16, AMX), and a trap elsewhere: on an AVX2-only CPU a bf16 matmul of the quickstart's
shapes is ~19x slower than fp32 and a Muon step took 9.7 s against 1.4 s for forward+backward. This
subclass keeps torch's hyperparameters, state (`momentum_buffer`) and update, and runs the same
quintic iteration in `ns_dtype`: with bf16 it gives torch's update exactly
(tests/test_machine_kinds.py).
"""

from __future__ import annotations

import math

import torch


def orthogonalize(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (~U V^T of the update's SVD), in `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype, copy=True)  # never the momentum buffer itself (nesterov=False passes it)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def iteration_shapes(matrices) -> list[tuple[int, int, int]]:
    """(m, k, n) of one Newton-Schulz iteration's matmuls for each distinct matrix shape (X X^T,
    then the two products), oriented as orthogonalize runs them: what a dtype screen should time."""
    shapes = {tuple(sorted(p.shape)) for p in matrices}
    return [m for r, c in shapes for m in ((r, c, r), (r, r, r), (r, r, c))]


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning rate: "match_rms_adamw" scales the update to AdamW's RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols)) if adjust_lr_fn in (None, "original") else lr


class Muon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # torch.optim.Muon: torch 2.9+
    """torch.optim.Muon whose Newton-Schulz iterations run in `ns_dtype` (the device's fast one)."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
