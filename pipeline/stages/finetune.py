"""Stage `finetune`: LoRA (or full) supervised fine-tuning on chat data, loss on assistant tokens only."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict
from pathlib import Path

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
from pipeline.model.hf_dir import (
    grow_vocab,
    load_causal_lm,
    load_chat_base,
    publish_hf_dir,
    sharded_launch,
)
from pipeline.model.inference import stops_at_end_of_turn
from pipeline.model.lora import apply_lora, merge_adapter
from pipeline.model.tokenizer import end_of_turn
from pipeline.stages.context import StageContext
from pipeline.train.bpb import token_byte_strings
from pipeline.train.loop import run_training
from pipeline.train.strategy import resolve_mixed_precision

NAME = "finetune"
DISTRIBUTED = True
KEEPS_WORK = True
UNTRACKED = ("checkpoints", "wandb", "tensorboard")
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    return [] if specs.finetune.base else ["pretrain"]


def config_slice(specs) -> dict:
    out = {"finetune": asdict(specs.finetune), "seed": specs.seed}
    if specs.finetune.base:  # an external base dir is an input too: its file names and sizes stand for it
        p = Path(specs.finetune.base).expanduser()
        files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()} if p.is_dir() else {}
        out["base"] = {"path": str(p.resolve()) if p.is_dir() else specs.finetune.base, "files": files}
    template = Path(specs.finetune.chat_template or "").expanduser()
    if template.is_file():  # an edited template renders different examples
        out["chat_template_text"] = template.read_text()
    return out


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


def run(ctx: StageContext) -> dict:
    spec, tspec = ctx.specs.finetune, ctx.specs.finetune.train
    base = spec.base or str(ctx.inputs["pretrain"].path / "model")
    dtype, attention = frozen_base_dtype(spec), packed_attention(spec)
    model, tokenizer, template, added = load_chat_base(base, spec, dtype, attention)
    if dtype != torch.float32:
        log.info("finetune: the frozen base in %s, LoRA weights in float32", str(dtype).removeprefix("torch."))
    if attention and not spec.attn_implementation:
        log.info("finetune: %s for packed rows (each micro-batch flattened to one row of sequences)", attention)
    eot = end_of_turn(tokenizer)
    if eot is None:
        log.warning("finetune: the chat template of %s ends an assistant turn with no special token; generation "
                    "will only stop at EOS", base)
    train_convs, val_convs, counts = load_conversations(spec.data)
    rendered = build_examples(tokenizer, train_convs, tspec.seq_len, eot, base, spec.data.skip_bad)
    train_ex, dropped = rendered.examples, rendered.too_long
    val_ex = build_examples(tokenizer, val_convs, tspec.seq_len, eot, base, spec.data.skip_bad).examples
    if rendered.split:
        log.info("finetune: %d conversations rendered as one example per assistant turn (their template renders "
                 "earlier turns differently once later turns follow): %d examples from %d conversations",
                 rendered.split, len(train_ex), len(train_convs))
    pad_id = tokenizer.pad_token_id
    example = show_trained_span(tokenizer, train_ex[0])
    log.info("finetune: one training example, trained tokens in [[ ]]:\n%s", example)
    packed = pack(train_ex, tspec.seq_len, pad_id) if spec.packing else None
    samples = ChatSamples(train_ex, ctx.specs.seed, pad_id, packed,
                          flatten=packed is not None and (spec.attn_implementation or attention) == "flash_attention_2")

    if added:
        log.info("finetune: %d tokens of the chat template are new or were never trained (%s): their embedding rows "
                 "start from related rows and train", len(added), " ".join(tokenizer.convert_ids_to_tokens(added)))
    if spec.quantize:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and input grads; activation checkpointing stays train.activation_checkpointing's
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.method == "lora":
        model = apply_lora(model, spec.lora, added)
    fpt = flops_per_token(model, tspec.seq_len) if hasattr(model.config, "num_hidden_layers") else None  # after
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    log.info("finetune: %s on %s, %d/%d params trainable (%.2f%%), %d train / %d val conversations (%d too long, "
             "%d bad)%s", spec.method, base, trainable, total, 100 * trainable / total, len(train_ex), len(val_ex),
             dropped, counts["bad"] + rendered.refused, f", packed into {len(packed)} rows" if packed else "")

    def publish(trained, state_dict):
        """adapter/ and/or merged/, each with the tokenizer + chat template, from the consolidated
        weights (never the live model, whose parameters may be shards): merged/ is the base
        reloaded plus the saved adapter."""
        if spec.method == "full":
            return publish_hf_dir(stops_at_end_of_turn(trained, tokenizer), tokenizer, ctx.out / "merged", state_dict)
        publish_hf_dir(trained, tokenizer, ctx.out / "adapter", state_dict)
        if spec.merge:
            # unquantized, in the base's own dtype: merged/ is a plain full model the size of its base
            reloaded = load_causal_lm(base, spec.trust_remote_code, dtype="auto")
            grow_vocab(reloaded, tokenizer)
            merged = merge_adapter(reloaded, ctx.out / "adapter")
            publish_hf_dir(stops_at_end_of_turn(merged, tokenizer), tokenizer, ctx.out / "merged")

    job = ctx.training_job(model, tspec, token_byte_strings(tokenizer), samples.batch,
                           lambda micro: eval_batches(val_ex, pad_id, micro), fpt, fixed_shapes=spec.packing)
    summary = run_training(job, publish)
    first, final = summary.get("initial", {}), summary.get("final", {})
    log.info("finetune: val loss %.4f -> %.4f, val bpb %.4f -> %.4f, %.0f tokens/s -> %s",
             first.get("val_loss", float("nan")), final.get("val_loss", float("nan")),
             first.get("val_bpb", float("nan")), final.get("val_bpb", float("nan")), summary["tokens_per_s"], ctx.out)
    return {
        "base": base, "method": spec.method, "chat_template": template, "trainable_params": trainable,
        "train_conversations": len(train_convs) - rendered.refused, "train_examples": len(train_ex),
        "val_conversations": len(val_ex), "dropped_too_long": dropped, "skipped_bad": counts["bad"] + rendered.refused,
        "end_of_turn": eot, "new_tokens": tokenizer.convert_ids_to_tokens(added), "split_by_turn": rendered.split,
        "packed_rows": len(packed) if packed else None,
        "initial_val_loss": first.get("val_loss"), "initial_val_bpb": first.get("val_bpb"),
        "final_val_loss": final.get("val_loss"), "final_val_bpb": final.get("val_bpb"),
        "steps": summary["steps"], "tokens_per_s": summary["tokens_per_s"], "resumed_from_step": summary["start_step"],
        "outputs": [d for d in ("adapter", "merged") if (ctx.out / d).is_dir()], "launch": summary["launch"],
        "example_trained_span": example[:2000],
    }
