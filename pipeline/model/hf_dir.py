"""Plain Hugging Face model directories: load them (local dir or hub name) and publish them atomically;
a chat base for fine-tuning is loaded in the dtype and attention its training calls for."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from pipeline.artifacts import replace_dir, staging_dir
from pipeline.device import resolve_mixed_precision
from pipeline.errors import PipelineError, first_line
from pipeline.model.tokenizer import end_of_turn, ensure_pad_token, use_chat_template


def publish_hf_dir(model, tokenizer, final: Path, state_dict: dict | None = None) -> None:
    """Write model (or PEFT adapter) + tokenizer to a temp dir and rename it to `final`, so the
    directory any HF tool loads is never half-written."""
    # An adapter keeps only the rows it trained (PEFT would save the whole resized embedding and
    # head otherwise: gigabytes); loading grows the base's vocabulary again (grow_vocab).
    extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
    with staging_dir(final) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **extra)
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


def load_causal_lm(path_or_name: str, trust_remote_code: bool = False, dtype=torch.float32, **kwargs):
    """A causal LM from a local HF dir (or a hub name). Weights load from safetensors only;
    kwargs go to from_pretrained (attn_implementation, quantization_config, device_map)."""
    from transformers import AutoModelForCausalLM

    _check_source(path_or_name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return AutoModelForCausalLM.from_pretrained(
            path_or_name, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
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


def grow_vocab(model, tokenizer, new_ids: list[int] | None = None) -> None:
    """Give every token of the tokenizer an embedding row (rows past the model's end are added)
    and start the rows of new tokens where the base already means something close: the
    end-of-turn token at the base's end-of-text row (a base model knows where text ends), any
    other at the mean of the rows of the words in its name (<|user|> -> "user"). Identical
    mean rows would leave the new tokens indistinguishable from each other at the start."""
    n_old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = sorted(set(new_ids or []) | set(range(n_old, len(tokenizer))))
    if not new_ids:
        return
    eos, eot = tokenizer.eos_token_id, end_of_turn(tokenizer)
    sources = {}
    for i in new_ids:
        token = tokenizer.convert_ids_to_tokens(i)
        if token == eot and eos is not None and eos not in new_ids:
            sources[i] = [eos]
        else:
            words = " ".join(re.sub(r"[^A-Za-z0-9]+", " ", token).split())
            sources[i] = [j for j in tokenizer(words, add_special_tokens=False)["input_ids"] if j not in new_ids]
    layers = {model.get_input_embeddings(), model.get_output_embeddings()} - {None}
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            old = torch.ones(min(n_old, len(w)), dtype=torch.bool)
            old[[i for i in new_ids if i < len(old)]] = False
            mean = w[: len(old)][old].float().mean(0)
            for i in new_ids:
                w[i] = (w[sources[i]].float().mean(0) if sources[i] else mean).to(w.dtype)


def untrained_template_tokens(model, tokenizer) -> list[int]:
    """Special tokens the chat template writes whose embedding rows were never trained: some base
    releases ship the instruct template's tokens with (near) zero rows (Llama 3's <|eot_id|> and
    header tokens). Left frozen, LoRA alone can hardly learn to produce them."""
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    except Exception:  # a template that cannot render a plain exchange: nothing to check
        return []
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    rows = model.get_input_embeddings().weight
    norms = rows.detach().float().norm(dim=1)
    floor = 1e-3 * float(norms.median())
    return sorted(i for i in set(ids) & special if i < len(norms) and float(norms[i]) < floor)


def sharded_launch() -> bool:
    """FSDP or DeepSpeed, as `accelerate launch` tells its processes before an Accelerator exists."""
    return os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def frozen_base_dtype(spec) -> torch.dtype:
    """bf16 for LoRA's frozen base on a GPU training in bf16: half the memory and no per-step cast
    of its weights, while PEFT keeps the LoRA weights fp32. fp32 elsewhere: a CPU's precision is
    measured later, FSDP flattens one dtype per unit, DeepSpeed casts the model itself, and a
    full fine-tune needs fp32 master weights."""
    gpu = torch.cuda.is_available() and not sharded_launch()
    if spec.method != "lora" or spec.quantize or not gpu:
        return torch.float32
    return torch.bfloat16 if resolve_mixed_precision(spec.train.mixed_precision) == "bf16" else torch.float32


def packed_attention(spec) -> str | None:
    """Packed rows on a GPU training in bf16/fp16 with flash-attn installed: flash-attention's
    variable-length kernel, which transformers drives from the restarting position ids of a single
    row (the micro-batch's rows are flattened into one), so no (rows, 1, seq, seq) mask is built.
    Otherwise the model's default (SDPA with a block-diagonal mask from the position ids)."""
    half = resolve_mixed_precision(spec.train.mixed_precision) in ("bf16", "fp16")
    if spec.packing and half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_chat_base(base: str, spec, dtype=torch.float32, attn_implementation: str | None = None):
    """(model, tokenizer, whose chat template, ids of tokens added for it) of the base for the
    finetune spec, checked to fit each other and the training sequence length, ready to fine-tune
    for chat (a chat template, its special tokens, a pad token). `attn_implementation` is used
    where spec.attn_implementation is not set."""
    tokenizer = load_tokenizer(base, spec.trust_remote_code)
    known = tokenizer.get_vocab()
    template = use_chat_template(tokenizer, base, spec.chat_template)
    added = sorted(i for t, i in tokenizer.get_vocab().items() if t not in known)
    ensure_pad_token(tokenizer)
    quantized = quantized_loading(spec.quantize) if spec.quantize else {}
    attention = spec.attn_implementation or attn_implementation
    model = load_causal_lm(base, spec.trust_remote_code, dtype, attn_implementation=attention, **quantized)
    n_embed = model.get_input_embeddings().num_embeddings
    if len(known) > n_embed:
        raise PipelineError(
            f"the tokenizer in {base} has {len(known)} tokens but the model only {n_embed} "
            f"embeddings; use the tokenizer that came with the model."
        )
    added = sorted(set(added) | set(untrained_template_tokens(model, tokenizer)))
    grow_vocab(model, tokenizer, added)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and spec.train.seq_len > max_pos:
        raise PipelineError(
            f"{spec.train._key}.seq_len={spec.train.seq_len} exceeds the model's {max_pos} positions; lower it."
        )
    return model, tokenizer, template, added


def quantized_loading(quantize: str) -> dict:
    """from_pretrained arguments for QLoRA: the frozen base in 4-bit NF4 (double-quantized),
    computing in bf16 (fp16 before Ampere), on this process's GPU."""
    if not torch.cuda.is_available():
        raise PipelineError(
            f"finetune.quantize={quantize} (QLoRA) needs a CUDA GPU for bitsandbytes' 4-bit kernels; "
            f"on this machine remove finetune.quantize to fine-tune the base unquantized."
        )
    if sharded_launch():
        raise PipelineError(
            f"finetune.quantize={quantize} runs on one GPU or under DDP (accelerate launch "
            f"--multi_gpu), not FSDP or DeepSpeed; launch it with conf/accelerate/ddp.yaml."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PipelineError(
            f"finetune.quantize={quantize} needs bitsandbytes: pip install 'pipeline[qlora]'."
        ) from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
