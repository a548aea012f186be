"""Plain Hugging Face model directories: load them (local dir or hub name) and publish them atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.artifacts import replace_dir, staging_dir
from pipeline.errors import PipelineError, first_line
from pipeline.model.tokenizer import ensure_chat_template, ensure_pad_token


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
        raise PipelineError(f"could not load a tokenizer from {path_or_name} ({first_line(e)}).") from None


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
            f"could not load a causal LM from {path_or_name} ({first_line(e)}); it must be a Hugging Face "
            f"model directory with config.json and *.safetensors weights."
        ) from None


def _check_source(path_or_name: str) -> None:
    p = Path(path_or_name).expanduser()
    looks_local = path_or_name.startswith((".", "/", "~")) or p.exists() or path_or_name.count("/") > 1
    if looks_local and not p.is_dir():
        raise PipelineError(f"model directory {path_or_name} does not exist; give a local HF model dir or a hub name.")


def load_chat_base(base: str, seq_len: int, trust_remote_code: bool = False):
    """(model, tokenizer, whose chat template) of the base, checked to fit each other and the
    training sequence length, ready to fine-tune for chat (a chat template and a pad token)."""
    tokenizer = load_tokenizer(base, trust_remote_code)
    template = ensure_chat_template(tokenizer, base)
    ensure_pad_token(tokenizer)
    model = load_causal_lm(base, trust_remote_code)
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise PipelineError(f"the tokenizer in {base} has {len(tokenizer)} tokens but the model only {n_embed} "
                            f"embeddings; use the tokenizer that came with the model.")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise PipelineError(f"finetune.train.seq_len={seq_len} exceeds the model's {max_pos} positions; lower it.")
    return model, tokenizer, template
