"""TrainSpec: the knobs of a training run (both stages, conf/train and finetune.train), checked when
the config is composed; and which of them a checkpoint's fingerprint leaves out."""

from __future__ import annotations

import re
from dataclasses import InitVar, dataclass
from typing import Any

from pipeline.errors import PipelineError

PRECISIONS = ("auto", "bf16", "fp16", "no")
DECAYS = ("cosine", "linear", "constant", "wsd")
# How a run is watched, saved, batched on the device or bounded in time, not what its weights
# become: checkpoints stay resumable when these change (a different max_steps: Trainer decides).
NOT_IN_CHECKPOINT_FINGERPRINT = (
    "max_steps",
    "time_budget",
    "log_every",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
    "micro_batch_size",
    "compile",
    "activation_checkpointing",
    "skip_nonfinite",
    "loss_chunk_tokens",
)
_DURATION = r"(\d+(?:\.\d+)?)\s*(min|s|h)"
_SECONDS = {"s": 1, "min": 60, "h": 3600}


def parse_duration(text, key: str) -> float:
    """'90s', '6min', '1.5h', '1h30min' -> seconds."""
    parts = re.findall(_DURATION, str(text))
    if not parts or re.sub(_DURATION, "", str(text)).strip() or not sum(float(n) for n, _ in parts) > 0:
        raise PipelineError(f"{key}={text!r} is not a duration; write e.g. 90s, 6min, 2h or 1h30min.")
    return sum(float(n) * _SECONDS[unit] for n, unit in parts)


@dataclass
class TrainSpec:
    max_steps: int = 300  # with time_budget: the most steps the budget may give
    time_budget: str | None = None  # e.g. 6min, 2h: the step count that fits is measured at the start
    batch_tokens: int = 4096  # global batch per optimizer step, in tokens (sequences x seq_len)
    micro_batch_size: Any = 16  # sequences per device per forward pass, or "auto" (largest that fits)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | linear | constant | wsd (warmup, stable, then a cooldown: runs can be extended)
    cooldown: float = 0.2  # wsd: the share of max_steps spent decaying, at the end
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    # auto (CUDA: bf16, else fp16; CPU: fp32 or bf16, whichever measures faster) | bf16 | fp16 | no
    mixed_precision: str = "auto"
    # torch.compile of model and loss together: true | false | auto (timed against eager at the start
    # where the run is long enough to repay trying). Falls back to eager, with a log line, if it fails.
    compile: Any = "auto"
    # Recompute activations in backward: less memory, ~20-30% slower. true | false | auto (on where a
    # micro-batch's activations, measured at the start, would take much of the memory free).
    activation_checkpointing: Any = "auto"
    # Loss over chunks of this many positions, their logits recomputed in backward: the full-vocabulary
    # logits are never kept. auto: where a micro batch's fp32 logits would pass 256 MiB; 0 = off.
    loss_chunk_tokens: Any = "auto"
    log_every: int = 10  # also how often values are read back from the GPU (and several processes agree to stop)
    eval_every: int = 100  # 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation
    ckpt_every: int = 100  # 0 = only at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 2  # 0 = keep all
    skip_nonfinite: int = 0  # skip up to this many steps whose loss or gradients are NaN/inf (0 = stop)
    key: InitVar[str] = "train"  # where these values live in the config, for error messages

    def __post_init__(self, key: str):
        """Raise a PipelineError naming `key`.FIELD for the first bad value."""
        self._key = key  # not a field: not part of the config or its hash
        micro = self.micro_batch_size
        if micro != "auto" and not (isinstance(micro, int) and not isinstance(micro, bool) and micro > 0):
            raise PipelineError(f"{key}.micro_batch_size={micro} must be a positive number or auto.")
        for name in ("compile", "activation_checkpointing"):
            if getattr(self, name) not in (True, False, "auto"):
                raise PipelineError(f"{key}.{name}={getattr(self, name)!r} must be true, false or auto.")
        chunk = self.loss_chunk_tokens
        if chunk != "auto" and not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0):
            raise PipelineError(f"{key}.loss_chunk_tokens={chunk} must be auto, 0 (off) or a number of positions.")
        for name in ("max_steps", "batch_tokens", "seq_len", "log_every", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"{key}.{name}={getattr(self, name)} must be a positive number.")
        for name in (
            "warmup_steps",
            "eval_every",
            "ckpt_every",
            "keep_checkpoints",
            "skip_nonfinite",
            "grad_clip",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                raise PipelineError(f"{key}.{name}={getattr(self, name)} must be 0 or more.")
        if not self.lr > 0:
            raise PipelineError(f"{key}.lr={self.lr} must be positive (e.g. 3e-4).")
        if self.optimizer not in ("adamw", "muon"):
            raise PipelineError(f"{key}.optimizer={self.optimizer!r} is unknown; use adamw or muon.")
        if not 0 < self.cooldown <= 1:
            raise PipelineError(
                f"{key}.cooldown={self.cooldown} must be in (0, 1]: the share of the steps spent decaying."
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise PipelineError(f"{key}.min_lr_ratio={self.min_lr_ratio} must be between 0 and 1.")
        if self.decay not in DECAYS:
            raise PipelineError(f"{key}.decay={self.decay!r} is unknown; use {', '.join(DECAYS)}.")
        if self.mixed_precision not in PRECISIONS:
            raise PipelineError(
                f"{key}.mixed_precision={self.mixed_precision!r} is unknown; use {', '.join(PRECISIONS)}."
            )
        if self.time_budget is not None:
            parse_duration(self.time_budget, f"{key}.time_budget")
            if self.decay != "constant" and self.warmup_steps < 3:
                raise PipelineError(
                    f"{key}.time_budget fixes the step count during warmup, so the decay can span it; set "
                    f"{key}.warmup_steps to 3 or more (it is {self.warmup_steps}) or {key}.decay=constant."
                )
        if self.batch_tokens % self.seq_len:
            raise PipelineError(
                f"{key}.batch_tokens={self.batch_tokens} is not a multiple of {key}.seq_len={self.seq_len}."
            )

    @property
    def budget_seconds(self) -> float | None:
        """train.time_budget in seconds (checked at construction), or None."""
        return parse_duration(self.time_budget, "time_budget") if self.time_budget is not None else None


def math_only(config):
    """A stage's config without the train keys that leave the weights as they are: what a
    checkpoint's fingerprint is made of."""
    if isinstance(config, dict):
        is_train = "warmup_steps" in config and "lr" in config
        return {k: math_only(v) for k, v in config.items() if not (is_train and k in NOT_IN_CHECKPOINT_FINGERPRINT)}
    return config
