"""ModelSpec: the architecture knobs of a model built from scratch (conf/model/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

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
