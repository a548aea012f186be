"""Build a causal LM from `transformers` classes (Llama, or Qwen3 for QK-norm), and count its
parameters and FLOPs. Either way the result is a plain AutoModelForCausalLM directory."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
)

from pipeline.config.model import ModelSpec


def hf_config(spec: ModelSpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> PretrainedConfig:
    """model.arch=llama: Llama blocks; qwen3: the same blocks with RMS-normed queries and keys
    (QK-norm), transformers' Qwen3 class."""
    d_ff = spec.d_ff or 64 * -(-8 * spec.d_model // 3 // 64)
    arch = {"llama": (LlamaConfig, {}), "qwen3": (Qwen3Config, {"head_dim": spec.d_model // spec.n_head})}
    config_class, extra = arch[spec.arch]
    return config_class(
        **extra,
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


def build_model(config: PretrainedConfig, seed: int, zero_init_proj: bool = False) -> PreTrainedModel:
    """A freshly initialised model; the same seed gives the same weights on every rank.
    zero_init_proj: each block's output projections (attention o_proj, MLP down_proj) start at
    zero, so every block starts as the identity on the residual stream."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if zero_init_proj:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith(("self_attn.o_proj", "mlp.down_proj")):
                    module.weight.zero_()
    return model


def numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty local tensor


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += numel(p)
    return total


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): each weight doing matmuls costs 2 forward and
    2 backward (the activation gradient), plus 2 more for its own gradient if it is trained, so
    6N for full training and about 4N for LoRA's frozen base; plus the attention scores.

    The input embedding is a lookup, not a matmul, so it is left out unless tied to the head.
    """
    cfg = model.config
    embedding = model.get_input_embeddings().weight
    lookup = [] if cfg.tie_word_embeddings else [embedding]
    # PEFT's modules_to_save keeps the frozen original beside the trained copy: only the copy runs.
    matmul = [
        p for name, p in model.named_parameters() if all(p is not e for e in lookup) and "original_module" not in name
    ]
    n, trained = sum(map(numel, matmul)), sum(numel(p) for p in matmul if p.requires_grad)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 4 * n + 2 * trained + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len
