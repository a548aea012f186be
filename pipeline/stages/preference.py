"""Stage `preference`: DPO (or IPO) with a new LoRA adapter on the fine-tuned model, through the same
training loop as the other stages; the reference is the same weights with the adapter off."""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from pipeline.data.jsonl import read_jsonl
from pipeline.data.pairs import PairSamples, eval_pair_batches, read_pairs, render_pairs, split_pairs, to_pair
from pipeline.errors import PipelineError
from pipeline.model.build import count_params, flops_per_token
from pipeline.model.finetuned import publish_finetuned
from pipeline.model.gguf_import import external_inputs, local_model_dir
from pipeline.model.hf_dir import frozen_base_dtype, load_chat_base
from pipeline.model.lora import apply_lora
from pipeline.model.tokenizer import end_of_turn
from pipeline.stages.base import TRAINING_WORK
from pipeline.stages.context import StageContext
from pipeline.train.assessment import training_warnings
from pipeline.train.loop import run_training
from pipeline.train.metrics_file import MetricsFile, plot_preference_curves
from pipeline.train.preference import PreferenceObjective

NAME = "preference"
DIR = "preference"  # runs/<name>/preference/: adapter/, merged/, metrics.jsonl
DISTRIBUTED = True
KEEPS_WORK = True  # its checkpoints survive a crash
UNTRACKED = TRAINING_WORK
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    spec = specs.preference
    return (["finetune"] if not spec.base else []) + (["pairs"] if spec.data.source == "self" else [])


def config_slice(specs) -> dict:
    spec = asdict(specs.preference)
    del spec["in_chain"]  # where it runs, not what it trains
    if specs.preference.data.source != "self":
        del spec["pairs"]
    return {"preference": spec, "seed": specs.seed, **external_inputs(specs.preference)}


def _base(ctx: StageContext) -> str:
    spec = ctx.specs.preference
    if spec.base:
        return local_model_dir(spec.base)
    merged = ctx.inputs["finetune"].path / "merged"
    if not merged.is_dir():
        raise PipelineError(
            f"preference tuning starts from the fine-tuned model's merged/ dir, and {merged.parent} has none; "
            f"set finetune.merge=true (or preference.base=path/to/model)."
        )
    return str(merged)


def _pairs(ctx: StageContext, tokenizer) -> tuple[list, list, int, int]:
    """(train, val, too long, bad): the pairs of preference.data, split and rendered."""
    data, counts = ctx.specs.preference.data, {"bad": 0}
    if data.source == "self":
        path = ctx.inputs["pairs"].path / "pairs.jsonl"
        pairs, where = read_jsonl(path, to_pair), str(path)
    else:
        pairs, where = read_pairs(data, counts), ", ".join(data.paths) or data.name
    train, val = split_pairs(pairs, data.val_fraction, data.max_val_pairs, where)
    if counts["bad"]:
        log.warning("preference data: skipped %d malformed records (preference.data.skip_bad=true)", counts["bad"])
    seq_len, eot = ctx.specs.preference.train.seq_len, end_of_turn(tokenizer)
    (train, too_long), (val, _) = (render_pairs(tokenizer, pairs, seq_len, eot) for pairs in (train, val))
    if not train or not val:
        raise PipelineError(
            f"no preference pair's prompt fits preference.train.seq_len={seq_len} "
            f"({'training' if not train else 'validation'} split); raise it."
        )
    return train, val, too_long, counts["bad"]


def _without_dropout(model) -> None:
    """The base's dropout off (GPT-2's resid/attn/embd 0.1, for one): with it the policy would differ
    from its reference at step 0 and the margins would be noise (TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # rates that attention modules apply themselves
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _publish(trained, state_dict: dict, **kwargs) -> None:
    """adapter/ and merged/ as the finetune stage writes them, and curves.png of the run."""
    publish_finetuned(trained, state_dict, **kwargs)
    out = kwargs["out_dir"]
    plot_preference_curves(MetricsFile(out / "metrics.jsonl").rows(), out / "curves.png")


def run(ctx: StageContext) -> dict:
    spec, tspec = ctx.specs.preference, ctx.specs.preference.train
    base = _base(ctx)
    model, tokenizer, _, added = load_chat_base(base, spec, frozen_base_dtype(spec), spec.attn_implementation)
    train, val, too_long, bad = _pairs(ctx, tokenizer)
    pad_id, width = tokenizer.pad_token_id, tspec.seq_len if spec.packing else 0
    samples = PairSamples(train, ctx.specs.seed, pad_id, width, flatten=spec.attn_implementation == "flash_attention_2")
    _without_dropout(model)
    model = apply_lora(model, spec.lora, added, ctx.specs.seed)
    trainable = count_params(model, trainable_only=True)
    log.info(
        "preference: %s (beta %g) with LoRA on %s, %d/%d params trainable, %d train / %d val pairs "
        "(%d prompts too long, %d bad)%s",
        "DPO" if spec.loss == "sigmoid" else spec.loss.upper(),
        spec.beta,
        base,
        trainable,
        count_params(model),
        len(train),
        len(val),
        too_long,
        bad,
        f", sequences packed into rows of {width}" if width else "",
    )
    job = ctx.training_job(
        model,
        tspec,
        None,
        samples.batch,
        lambda micro: eval_pair_batches(val, pad_id, micro, width),
        flops_per_token(model, tspec.seq_len) if hasattr(model.config, "num_hidden_layers") else None,
        fixed_shapes=False,
        objective=PreferenceObjective(spec.beta, spec.loss, spec.label_smoothing, spec.sft_weight),
    )
    summary = run_training(job, partial(_publish, tokenizer=tokenizer, out_dir=ctx.out, spec=spec, base=base))
    warnings = _log_result(summary, ctx.out, tspec)
    return {
        "base": base,
        "loss": spec.loss,
        "beta": spec.beta,
        "trainable_params": trainable,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "dropped_too_long": too_long,
        "skipped_bad": bad,
        "initial": summary.get("initial", {}),
        "final": summary.get("final", {}),
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "resumed_from_step": summary["start_step"],
        "outputs": [d for d in ("adapter", "merged") if (ctx.out / d).is_dir()],
        "launch": summary["launch"],
        "warnings": warnings,
    }


def _log_result(summary: dict, out: Path, tspec) -> list[str]:
    """The stage's result line, then any warning that it is undertrained."""
    first, final = summary.get("initial", {}), summary.get("final", {})
    log.info(
        "preference: val loss %.4f -> %.4f, reward accuracy %.3f -> %.3f, margin %.4f, %.0f tokens/s -> %s",
        first.get("val_loss", float("nan")),
        final.get("val_loss", float("nan")),
        first.get("val_reward_accuracy", float("nan")),
        final.get("val_reward_accuracy", float("nan")),
        final.get("val_reward_margin", float("nan")),
        summary["tokens_per_s"],
        out,
    )
    warnings = training_warnings(summary, tspec, "preference.train")
    for line in warnings:
        log.warning("preference: %s", line)
    return warnings
