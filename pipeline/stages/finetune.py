"""Stage `finetune`: LoRA (or full) supervised fine-tuning on chat data, loss on assistant tokens only."""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.data.chat import (
    ChatSamples,
    build_examples,
    eval_batches,
    pack,
    show_trained_span,
)
from pipeline.data.conversations import load_conversations
from pipeline.model.build import count_params, flops_per_token
from pipeline.model.finetuned import publish_finetuned
from pipeline.model.gguf_import import external_inputs, local_model_dir
from pipeline.model.hf_dir import frozen_base_dtype, load_chat_base, packed_attention
from pipeline.model.lora import apply_lora
from pipeline.model.tokenizer import end_of_turn
from pipeline.stages.base import TRAINING_WORK
from pipeline.stages.context import StageContext
from pipeline.train.assessment import training_warnings
from pipeline.train.bpb import token_byte_strings
from pipeline.train.loop import run_training

NAME = "finetune"
DIR = "finetune"  # runs/<name>/finetune/
DISTRIBUTED = True  # every rank trains the adapter; the runner publishes adapter/ and merged/ from the main one
KEEPS_WORK = True  # its checkpoints survive a crash: the next run resumes the adapter's training
UNTRACKED = TRAINING_WORK
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    return [] if specs.finetune.base else ["pretrain"]


def config_slice(specs) -> dict:
    return {"finetune": asdict(specs.finetune), "seed": specs.seed, **external_inputs(specs.finetune)}


class ChatData(NamedTuple):
    """The chat data rendered for training, and what was left out."""

    conversations: int  # training conversations rendered (those the template refused not counted)
    train: list  # training examples
    val: list  # validation examples
    too_long: int  # training conversations longer than seq_len, dropped
    bad: int  # conversations skipped as malformed or refused by the template
    split: int  # conversations rendered as one example per assistant turn
    packed: list | None  # the training examples packed into rows (finetune.packing), else None
    example: str  # the first training example, trained tokens in [[ ]]


def _load_base(base: str, spec):
    """(model, tokenizer, template, added token ids, attention) of the base, in the dtype and
    attention that model loading picks for this fine-tune."""
    dtype, attention = frozen_base_dtype(spec), packed_attention(spec)
    model, tokenizer, template, added = load_chat_base(base, spec, dtype, attention)
    if dtype != torch.float32:
        log.info("finetune: the frozen base in %s, LoRA weights in float32", str(dtype).removeprefix("torch."))
    if attention and not spec.attn_implementation:
        log.info("finetune: %s for packed rows (each micro-batch flattened to one row of sequences)", attention)
    return model, tokenizer, template, added, attention


def _chat_data(tokenizer, spec, eot: int | None, base: str) -> ChatData:
    """The train and val conversations rendered through the chat template (and packed)."""
    train_convs, val_convs, counts = load_conversations(spec.data)
    seq_len, skip_bad = spec.train.seq_len, spec.data.skip_bad
    rendered = build_examples(tokenizer, train_convs, seq_len, eot, base, skip_bad)
    val_ex = build_examples(tokenizer, val_convs, seq_len, eot, base, skip_bad).examples
    if rendered.split:
        log.info(
            "finetune: %d conversations rendered as one example per assistant turn (their template renders "
            "earlier turns differently once later turns follow): %d examples from %d conversations",
            rendered.split,
            len(rendered.examples),
            len(train_convs),
        )
    example = show_trained_span(tokenizer, rendered.examples[0])
    log.info("finetune: one training example, trained tokens in [[ ]]:\n%s", example)
    packed = pack(rendered.examples, seq_len, tokenizer.pad_token_id) if spec.packing else None
    return ChatData(
        len(train_convs) - rendered.refused,
        rendered.examples,
        val_ex,
        rendered.too_long,
        counts["bad"] + rendered.refused,
        rendered.split,
        packed,
        example,
    )


def _trainable(model, spec, added: list[int], seed: int):
    """The base ready to train: prepared for 4-bit training when quantized, wrapped by LoRA for method=lora."""
    if spec.quantize:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and input grads; activation checkpointing stays train.activation_checkpointing's
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.method == "lora":
        model = apply_lora(model, spec.lora, added, seed)
    return model


def _warn_no_end_of_turn(base: str) -> None:
    log.warning(
        "finetune: the chat template of %s ends an assistant turn with no special token; generation "
        "will only stop at EOS",
        base,
    )


def _log_added_tokens(tokenizer, added: list[int]) -> None:
    log.info(
        "finetune: %d tokens of the chat template are new or were never trained (%s): their embedding rows "
        "start from related rows and train",
        len(added),
        " ".join(tokenizer.convert_ids_to_tokens(added)),
    )


def _log_plan(spec, base: str, trainable: int, total: int, data: ChatData) -> None:
    """Log the method, the trainable share of the params and the data before training."""
    log.info(
        "finetune: %s on %s, %d/%d params trainable (%.2f%%), %d train / %d val conversations (%d too long, %d bad)%s",
        spec.method,
        base,
        trainable,
        total,
        100 * trainable / total,
        len(data.train),
        len(data.val),
        data.too_long,
        data.bad,
        f", packed into {len(data.packed)} rows" if data.packed else "",
    )


def _log_result(summary: dict, out: Path, tspec) -> list[str]:
    """The stage's result line, then any warning that the model is undertrained (its last words)."""
    first, final = summary.get("initial", {}), summary.get("final", {})
    log.info(
        "finetune: val loss %.4f -> %.4f, val bpb %.4f -> %.4f, %.0f tokens/s -> %s",
        first.get("val_loss", float("nan")),
        final.get("val_loss", float("nan")),
        first.get("val_bpb", float("nan")),
        final.get("val_bpb", float("nan")),
        summary["tokens_per_s"],
        out,
    )
    warnings = training_warnings(summary, tspec, "finetune.train")
    for line in warnings:
        log.warning("finetune: %s", line)
    return warnings


def _training_facts(summary: dict, out: Path, warnings: list[str]) -> dict:
    first, final = summary.get("initial", {}), summary.get("final", {})
    return {
        "initial_val_loss": first.get("val_loss"),
        "initial_val_bpb": first.get("val_bpb"),
        "final_val_loss": final.get("val_loss"),
        "final_val_bpb": final.get("val_bpb"),
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "resumed_from_step": summary["start_step"],
        "outputs": [d for d in ("adapter", "merged") if (out / d).is_dir()],
        "launch": summary["launch"],
        "warnings": warnings,
    }


def run(ctx: StageContext) -> dict:
    spec, tspec = ctx.specs.finetune, ctx.specs.finetune.train
    base = local_model_dir(spec.base) if spec.base else str(ctx.inputs["pretrain"].path / "model")
    model, tokenizer, template, added, attention = _load_base(base, spec)
    eot = end_of_turn(tokenizer)
    if eot is None:
        _warn_no_end_of_turn(base)
    data = _chat_data(tokenizer, spec, eot, base)
    pad_id = tokenizer.pad_token_id
    flatten = data.packed is not None and (spec.attn_implementation or attention) == "flash_attention_2"
    samples = ChatSamples(data.train, ctx.specs.seed, pad_id, data.packed, flatten=flatten)
    if added:
        _log_added_tokens(tokenizer, added)
    model = _trainable(model, spec, added, ctx.specs.seed)
    fpt = flops_per_token(model, tspec.seq_len) if hasattr(model.config, "num_hidden_layers") else None  # after
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    _log_plan(spec, base, trainable, total, data)
    job = ctx.training_job(
        model,
        tspec,
        token_byte_strings(tokenizer),
        samples.batch,
        lambda micro: eval_batches(data.val, pad_id, micro),
        fpt,
        fixed_shapes=spec.packing,
    )
    publish = partial(publish_finetuned, tokenizer=tokenizer, out_dir=ctx.out, spec=spec, base=base)
    summary = run_training(job, publish)
    warnings = _log_result(summary, ctx.out, tspec)
    return {
        "base": base,
        "method": spec.method,
        "chat_template": template,
        "trainable_params": trainable,
        "train_conversations": data.conversations,
        "train_examples": len(data.train),
        "val_conversations": len(data.val),
        "dropped_too_long": data.too_long,
        "skipped_bad": data.bad,
        "end_of_turn": eot,
        "new_tokens": tokenizer.convert_ids_to_tokens(added),
        "split_by_turn": data.split,
        "packed_rows": len(data.packed) if data.packed else None,
        **_training_facts(summary, ctx.out, warnings),
        "example_trained_span": data.example[:2000],
    }
