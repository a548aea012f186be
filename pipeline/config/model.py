"""Specs of a model: the architecture built from scratch (conf/model) and its LoRA adapters (finetune.lora)."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from pipeline.errors import PipelineError


@dataclass
class ModelSpec:
    """Architecture knobs; the vocabulary size always comes from the tokenizer artifact."""

    arch: str = "llama"  # llama | qwen3 (Llama blocks with QK-norm)
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    d_ff: int | None = None  # MLP width; None = 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    zero_init_proj: bool = False  # blocks' output projections (o_proj, down_proj) start at zero

    def __post_init__(self):
        if self.arch not in ("llama", "qwen3"):
            raise PipelineError(f"model.arch={self.arch!r} is unknown; use llama or qwen3 (QK-norm).")
        for name in ("d_model", "n_layer", "n_head", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"model.{name}={getattr(self, name)} must be a positive number.")
        if self.d_model % self.n_head:
            raise PipelineError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}.")
        if self.n_head % (self.n_kv_head or self.n_head):
            raise PipelineError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}.")


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # every linear of the blocks
    modules_to_save: list[str] | None = None  # e.g. [lm_head] to train it fully as well
    key: InitVar[str] = "finetune.lora"  # where these values live in the config, for error messages

    def __post_init__(self, key: str):
        if self.r <= 0 or self.alpha <= 0:
            raise PipelineError(f"{key}.r={self.r} and {key}.alpha={self.alpha} must be positive.")
        if not 0 <= self.dropout < 1:
            raise PipelineError(f"{key}.dropout={self.dropout} must be in [0, 1).")
        if not self.target_modules:
            raise PipelineError(f"{key}.target_modules is empty; use [all-linear] or name the modules.")
