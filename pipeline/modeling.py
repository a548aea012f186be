"""Build a Llama-style causal LM from `transformers` classes, and count its parameters and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.artifacts import replace_dir, staging_dir
from pipeline.errors import PipelineError


@dataclass
class ModelSpec:
    """Architecture knobs; the vocabulary size always comes from the tokenizer artifact."""

    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    d_ff: int | None = None  # MLP width; None = 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise PipelineError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}.")
        if self.n_head % (self.n_kv_head or self.n_head):
            raise PipelineError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}.")


def hf_config(spec: ModelSpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> LlamaConfig:
    d_ff = spec.d_ff or 64 * -(-8 * spec.d_model // 3 // 64)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.d_model,
        intermediate_size=d_ff,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_kv_head or spec.n_head,
        max_position_embeddings=spec.max_seq_len,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attn_implementation="sdpa",
    )


def build_model(config: LlamaConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised model; the same seed gives the same weights on every rank."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty local tensor
    return total


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters doing matmuls) + attention scores (PaLM appendix B).

    The input embedding is a lookup, not a matmul, so it is left out unless tied to the head.
    """
    cfg = model.config
    n = count_params(model)
    if not cfg.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len


def publish_hf_dir(model, tokenizer, final: Path, state_dict: dict | None = None) -> None:
    """Write model (or PEFT adapter) + tokenizer to a temp dir and rename it to `final`, so the
    directory any HF tool loads is never half-written."""
    with staging_dir(final) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)


def load_tokenizer(path_or_name: str, trust_remote_code: bool = False):
    """A tokenizer from a local HF dir (or a hub name, which needs network)."""
    from transformers import AutoTokenizer

    _check_source(path_or_name)
    try:
        return AutoTokenizer.from_pretrained(path_or_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(f"could not load a tokenizer from {path_or_name} ({_first_line(e)}).") from None


def load_causal_lm(path_or_name: str, trust_remote_code: bool = False, dtype=torch.float32):
    """A causal LM from a local HF dir (or a hub name). Weights load from safetensors only."""
    from transformers import AutoModelForCausalLM

    _check_source(path_or_name)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path_or_name, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"could not load a causal LM from {path_or_name} ({_first_line(e)}); it must be a Hugging Face "
            f"model directory with config.json and *.safetensors weights."
        ) from None


def _check_source(path_or_name: str) -> None:
    p = Path(path_or_name).expanduser()
    looks_local = path_or_name.startswith((".", "/", "~")) or p.exists() or path_or_name.count("/") > 1
    if looks_local and not p.is_dir():
        raise PipelineError(f"model directory {path_or_name} does not exist; give a local HF model dir or a hub name.")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
