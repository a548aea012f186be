"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pipeline.config.train import TrainSpec
from pipeline.errors import PipelineError
from pipeline.train.muon import Muon


def decay_start(spec: TrainSpec, max_steps: int | None = None) -> int:
    """The step the learning rate starts to fall in a run of max_steps (default spec's): after
    warmup for cosine and linear, at the cooldown for wsd, never (max_steps) for constant."""
    steps = spec.max_steps if max_steps is None else max_steps
    if spec.decay == "wsd":
        return max(spec.warmup_steps, steps - round(spec.cooldown * steps))
    return steps if spec.decay == "constant" else spec.warmup_steps


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine/linear decay to lr * min_lr_ratio at max_steps; constant; or
    wsd: constant until the cooldown, then 1 - sqrt decay to the floor (Hägele et al. 2024)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    start = decay_start(spec)
    if step < start:
        return spec.lr
    progress = min((step - start) / max(1, spec.max_steps - start), 1.0)
    if spec.decay == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - math.sqrt(progress) if spec.decay == "wsd" else 1 - progress
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, biases and embeddings do not. Frozen parameters are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: torch.nn.Module,
    spec: TrainSpec,
    fused: bool,
    sharded: bool = False,
    muon_dtype: torch.dtype = torch.bfloat16,
) -> torch.optim.Optimizer:
    """AdamW over param_groups (`fused`: one kernel for all tensors, where the device has it), or
    with train.optimizer=muon, Muon for the hidden weight matrices (its Newton-Schulz iterations in
    `muon_dtype`) and AdamW for the rest."""
    adamw = dict(lr=spec.lr, betas=(spec.beta1, spec.beta2), fused=fused)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, spec.weight_decay), **adamw)
    if not hasattr(torch.optim, "Muon"):
        raise PipelineError(
            f"train.optimizer=muon needs torch 2.9 or later (this is {torch.__version__}); "
            "upgrade torch or set train.optimizer=adamw."
        )
    if sharded:
        raise PipelineError(
            "train.optimizer=muon needs whole weight matrices on each process; use it with one "
            "process or DDP, not FSDP or DeepSpeed."
        )
    if hasattr(model, "peft_config"):
        raise PipelineError(
            "train.optimizer=muon is for pretraining and full fine-tuning; LoRA adapters train with "
            "finetune.train.optimizer=adamw."
        )
    hidden = {id(p) for p in hidden_matrices(model)}
    if not hidden:
        raise PipelineError(
            "train.optimizer=muon found no trained weight matrices inside the model's blocks; "
            "use train.optimizer=adamw."
        )
    rest = [
        {**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in param_groups(model, spec.weight_decay)
    ]
    # match_rms_adamw scales each matrix's update to AdamW's RMS, so one lr and weight decay serve both.
    muon = Muon(
        [p for p in model.parameters() if id(p) in hidden],
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype=muon_dtype,
    )
    return MuonAndAdamW(muon, torch.optim.AdamW([g for g in rest if g["params"]], **adamw))


def hidden_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The trained 2-D weights of the linear layers inside the blocks: not the embeddings or the
    output head (Muon orthogonalises updates of matrices that map hidden states to hidden states)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head and m.weight.requires_grad and m.weight.dim() == 2
    ]


class MuonAndAdamW(torch.optim.Optimizer):
    """Two optimizers stepped as one: a single param_groups list (the schedule sets every lr), one
    state dict in checkpoints, one step and zero_grad for the training loop and accelerate."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts
        super().__init__([g for o in parts for g in o.param_groups], {})  # the same group dicts as the parts

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, state in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(state)
        # Loading gives the parts new group dicts (accelerate's prepare loads once too): point this
        # list at them again, or the schedule's lr would never reach the parts.
        self.param_groups[:] = [g for part in self.parts for g in part.param_groups]
