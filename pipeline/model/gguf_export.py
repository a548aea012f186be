"""GGUF out: a model this project pretrained or fine-tuned (or a Llama-family HF dir) as a `.gguf`
file for llama.cpp, Ollama and LM Studio, written with the `gguf` package's writer, plus an
Ollama Modelfile.

What goes in: the hyperparameters llama.cpp reads for the architecture (llama, qwen3), the
weights (f16, or q8_0 for the 2-D matrices whose rows split into 32-value blocks; norms stay
f32), and the byte-level BPE tokenizer (tokens, types, merges, special token ids, whether BOS is
added, the chat template and its end-of-turn token). llama.cpp's llama layout interleaves the
halves of each query/key head for its rotary embedding, so those weights are permuted as its own
converter (convert_hf_to_gguf.py) does; transformers' GGUF reader undoes it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.model.tokenizer import end_of_turn

log = logging.getLogger("pipeline")
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
TYPES = ("f16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PipelineError("writing GGUF needs the gguf package: pip install 'gguf>=0.10.0'.") from None
    return gguf


def arch_of(model) -> str:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise PipelineError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} (the architectures this project pretrains and the "
            f"Llama family it fine-tunes), not {name}."
        )
    return ARCHITECTURES[name]


def _hyperparameters(writer, config, arch: str, qtype: str, gguf) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise PipelineError(f"GGUF export writes plain RoPE only, not {rope.get('rope_type') or rope.get('type')}.")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    else:
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])


def pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name for the tokenizer's split (llama-vocab.cpp): plain byte-level with the
    GPT-2 regex is "gpt-2", digits split one by one before it (SmolLM) "smollm"; anything else
    (a normalizer, byte fallback, another regex) is refused rather than written wrong."""
    pre, model = data.get("pre_tokenizer") or {}, data["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer"):
        raise PipelineError("GGUF export writes byte-level BPE tokenizers (no normalizer, no byte fallback) only.")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    raise PipelineError(f"GGUF export does not know llama.cpp's name for this pre-tokenizer ({pre}).")


def _tokenizer(writer, tokenizer, vocab_size: int, gguf, chat: bool) -> None:
    """Byte-level BPE as llama.cpp's "gpt2" tokenizer model, with its pre-tokenizer's name."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer_name(data)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a.get("special", False) for a in data.get("added_tokens", [])}
    special = set(tokenizer.all_special_ids) | {i for i, is_special in added.items() if is_special}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # rows past the tokenizer: padding
    kinds = gguf.TokenType

    def kind(i: int):  # added words (Qwen3's <think>) stay whole in llama.cpp as user-defined
        return kinds.CONTROL if i in special else kinds.USER_DEFINED if i in added else kinds.NORMAL

    types = [kind(i) if i in by_id else kinds.UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    eot = end_of_turn(tokenizer)
    if eot:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot))
    if tokenizer.chat_template and chat:  # a base's template is untrained: llama-server would use it
        writer.add_chat_template(tokenizer.chat_template)


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for llama q/k rows (convert_hf_to_gguf.py's LlamaModel.permute)."""
    rows = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(writer, model, arch: str, qtype: str, gguf) -> int:
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for a model without an output matrix
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PipelineError(f"GGUF export has no name for the tensor {hf_name}: not {arch}'s layout.")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = _permute(data, heads)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif qtype == "q8_0" and data.shape[-1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data.astype(np.float16))
        count += 1
    return count


def write_gguf(model, tokenizer, out: Path, qtype: str, name: str, chat: bool = True) -> dict:
    """Write `model` and `tokenizer` to `out` (via a temp file: never a half-written .gguf)."""
    if qtype not in TYPES:
        raise PipelineError(f"GGUF type {qtype!r} is not offered; use one of {', '.join(TYPES)}.")
    gguf = _gguf()
    arch = arch_of(model)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)  # tensors spill to disk, not RAM
    try:
        writer.add_name(name)
        _hyperparameters(writer, model.config, arch, qtype, gguf)
        _tokenizer(writer, tokenizer, model.config.vocab_size, gguf, chat)
        tensors = _tensors(writer, model, arch, qtype, gguf)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": str(out), "type": qtype, "architecture": arch, "tensors": tensors, "bytes": out.stat().st_size}


def _turn_parts(tokenizer, eot: str) -> dict[str, tuple[str, str]] | None:
    """role -> (text before the content, text after it up to and including the end-of-turn), read
    off the chat template by rendering a conversation with marker contents; None where the
    template does not render system, user and assistant turns that way."""
    markers = {"system": "\x01", "user": "\x02", "assistant": "\x03"}
    messages = [{"role": r, "content": m} for r, m in markers.items()]
    try:
        text, prompt, alone = (
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
            for m, g in ((messages, False), (messages[:2], True), (messages[1:2], False))
        )
    except Exception:  # noqa: BLE001 - a template that refuses a system turn, for one
        return None
    bos = tokenizer.bos_token or ""
    if bos and text.startswith(bos):  # GGUF's add_bos puts it there: not in the template too
        text, prompt, alone = (t.removeprefix(bos) for t in (text, prompt, alone))
    parts, start = {}, 0
    for role, marker in markers.items():
        at = text.find(marker, start)
        end = text.find(eot, at)
        if at < 0 or end < 0:
            return None
        end += len(eot) + (text[end + len(eot) : end + len(eot) + 1] == "\n")
        parts[role] = (text[start:at], text[at + 1 : end])
        start = end
    user_end = prompt.find("\x02") + 1 + len(parts["user"][1])
    parts["generation"] = (prompt[user_end:], "")
    before = alone[: alone.find(parts["user"][0] + "\x02")]
    system_pre, system_post = parts["system"]
    if before.startswith(system_pre) and before.endswith(system_post) and len(before) > len(system_pre + system_post):
        parts["default_system"] = (before[len(system_pre) : -len(system_post)].rstrip("\n").removesuffix(eot), "")
    return parts


def ollama_modelfile(tokenizer, gguf_name: str, chat: bool) -> str:
    """An Ollama Modelfile: the template as a Go template, the end-of-turn as the stop token."""
    lines = ["# ollama create NAME -f Modelfile   (then: ollama run NAME)", f"FROM ./{gguf_name}"]
    eot = end_of_turn(tokenizer) if chat else None
    parts = _turn_parts(tokenizer, eot) if eot and tokenizer.chat_template else None
    if parts is None:
        if chat:
            log.warning("export: the chat template could not be turned into Ollama's; the Modelfile completes text")
        return "\n".join(lines + ['TEMPLATE """{{ .Prompt }}"""', ""])  # a base model: plain completion
    # No "{{-" after a turn: it would trim the newline that ends the turn.
    body = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}'
        for i, (role, (pre, post)) in enumerate((r, parts[r]) for r in ("system", "user", "assistant"))
    )
    template = f"{{{{- range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{parts['generation'][0]}"
    lines.append(f'TEMPLATE """{template}"""')
    if "default_system" in parts:  # the template's own system turn when a conversation has none
        lines.append(f'SYSTEM """{parts["default_system"][0]}"""')
    return "\n".join(lines + [f'PARAMETER stop "{eot}"', ""])
