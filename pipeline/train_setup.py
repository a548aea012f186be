"""What a training run is set up with: the TrainSpec, the batch layout it implies for a number
of processes, the learning-rate schedule, the optimizer and the precision."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import PipelineError


@dataclass
class TrainSpec:
    max_steps: int = 300
    batch_tokens: int = 4096  # global batch per optimizer step, in tokens (sequences x seq_len)
    micro_batch_size: Any = 16  # sequences per device per forward pass, or "auto" (largest that fits)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that support it, fp32 on CPU) | bf16 | fp16 | no
    compile: bool = False  # torch.compile; falls back to eager (with a log line) if it fails
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    log_every: int = 10  # also how often values are read back from the GPU (and several processes agree to stop)
    eval_every: int = 100  # 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation
    ckpt_every: int = 100  # 0 = only at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 2
    skip_nonfinite: int = 0  # skip up to this many steps whose loss or gradients are NaN/inf (0 = stop)

    def __post_init__(self):
        if self.micro_batch_size != "auto" and not (isinstance(self.micro_batch_size, int) and self.micro_batch_size > 0):
            raise PipelineError(f"train.micro_batch_size={self.micro_batch_size} must be a positive number or auto.")
        for name in ("max_steps", "batch_tokens", "seq_len", "log_every"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"train.{name}={getattr(self, name)} must be a positive number.")
        if not self.lr > 0:
            raise PipelineError(f"train.lr={self.lr} must be positive (e.g. 3e-4).")
        if self.decay not in ("cosine", "linear", "constant"):
            raise PipelineError(f"train.decay={self.decay!r} is unknown; use cosine, linear or constant.")


def batch_layout(spec: TrainSpec, world: int, micro_batch: int | None = None) -> tuple[int, int, int]:
    """(global sequences, per-device micro-batch, accumulation steps) for a global token batch.
    `micro_batch` overrides spec.micro_batch_size (used for "auto")."""
    if spec.batch_tokens % spec.seq_len:
        raise PipelineError(
            f"train.batch_tokens={spec.batch_tokens} is not a multiple of train.seq_len={spec.seq_len}."
        )
    global_seqs = spec.batch_tokens // spec.seq_len
    if global_seqs % world:
        raise PipelineError(
            f"the global batch of {global_seqs} sequences does not split over {world} processes; "
            f"set train.batch_tokens to a multiple of {world * spec.seq_len}."
        )
    per_rank = global_seqs // world
    micro = min(micro_batch or spec.micro_batch_size, per_rank)
    if per_rank % micro:
        raise PipelineError(
            f"{per_rank} sequences per process is not a multiple of train.micro_batch_size={micro}; "
            f"pick a micro batch that divides it."
        )
    return global_seqs, micro, per_rank // micro


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


def make_optimizer(model: torch.nn.Module, spec: TrainSpec, fused: bool) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms/biases/embeddings do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), fused=fused)


def has_accelerator() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPU: measured on the 2-core AVX-512-bf16 Xeon (scripts/bench/pretrain.py, model=small),
    # fp32 eager ran at ~4.9k tokens/s and bf16 autocast at ~3.0k, so fp32 is the default there.
    return "no"
