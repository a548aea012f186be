"""Stage `pretrain`: train a causal LM from scratch on the token shards; save an HF model dir."""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

from transformers import AutoTokenizer

from pipeline.artifacts import check_lineage
from pipeline.data.shards import open_split
from pipeline.data.windows import PackedWindows, eval_windows
from pipeline.model.build import build_model, count_params, flops_per_token, hf_config
from pipeline.model.hf_dir import publish_hf_dir
from pipeline.model.tokenizer import stops_at_end_of_turn
from pipeline.stages.base import TRAINING_WORK
from pipeline.stages.context import StageContext
from pipeline.train.assessment import training_warnings
from pipeline.train.bpb import compressor_references, token_byte_strings
from pipeline.train.loop import run_training
from pipeline.train.metrics_file import MetricsFile, plot_curves

NAME = "pretrain"
DIR = "pretrain"  # runs/<name>/pretrain/
DISTRIBUTED = True  # every rank trains the model; the runner publishes from the main process
KEEPS_WORK = True  # checkpoints survive a crash so the next run resumes
UNTRACKED = TRAINING_WORK
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    return ["tokenizer", "prepare"]


def config_slice(specs) -> dict:
    return {"model": asdict(specs.model), "train": asdict(specs.train), "seed": specs.seed}


def _log_plan(tspec, n_params: int, fpt: float, num_windows: int, val_tokens: int, references: dict) -> None:
    """Log the model size, the token budget and the compressor baselines before training."""
    budget = tspec.max_steps * tspec.batch_tokens
    steps = (
        f"a time budget of {tspec.time_budget} (at most {tspec.max_steps} steps)"
        if tspec.time_budget
        else f"{tspec.max_steps} steps x {tspec.batch_tokens} tokens = {budget / 1e6:.1f}M tokens "
        f"({budget / n_params:.1f} tokens/param)"
    )
    log.info(
        "pretrain: %.2fM params, %.1f MFLOPs/token, %s, %d train windows, %d val tokens",
        n_params / 1e6,
        fpt / 1e6,
        steps,
        num_windows,
        val_tokens,
    )
    log.info(
        "reference: on the same validation text gzip -9 reaches %.4f bits/byte, xz -9e %.4f",
        references["gzip9_val_bpb"],
        references["xz9_val_bpb"],
    )


def publish_pretrained(trained, state_dict, *, tokenizer, out: Path, references: dict, max_steps: int) -> None:
    """The HF model dir under `out`, plus the compressor baselines as a last metrics row and in the curves."""
    reference = references["gzip9_val_bpb"]
    publish_hf_dir(trained, tokenizer, out / "model", state_dict)
    metrics = MetricsFile(out / "metrics.jsonl")
    last_step = max((r["step"] for r in metrics.rows()), default=max_steps)  # a time budget decides it
    metrics.write(
        {
            "step": last_step,
            "reference": "gzip -9, xz -9e",
            "gzip_bpb": reference,
            "xz_bpb": references["xz9_val_bpb"],
        }
    )
    plot_curves(metrics.rows(), out / "curves.png", {"gzip -9": reference, "xz -9e": references["xz9_val_bpb"]})


def _log_result(summary: dict, references: dict, model_dir: Path) -> None:
    final = summary.get("final", {})
    reference = references["gzip9_val_bpb"]
    verdict = "below" if final.get("val_bpb", 99) < reference else "NOT below"
    log.info(
        "pretrain: val bpb %.4f (%s gzip -9 at %.4f; xz -9e %.4f), val loss %.4f, %.0f tokens/s -> %s",
        final.get("val_bpb", float("nan")),
        verdict,
        reference,
        references["xz9_val_bpb"],
        final.get("val_loss", float("nan")),
        summary["tokens_per_s"],
        model_dir,
    )


def _facts(summary: dict, references: dict, n_params: int, vocab_size: int, fpt: float) -> dict:
    """The stage's facts for the manifest, from the training summary."""
    final = summary.get("final", {})
    return {
        "params": n_params,
        "vocab_size": vocab_size,
        "flops_per_token": fpt,
        "tokens_seen": summary["tokens_seen"],
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_val_loss": final.get("val_loss"),
        "final_val_bpb": final.get("val_bpb"),
        **references,
        "resumed_from_step": summary["start_step"],
        "processes": summary["launch"]["processes"],
        "mixed_precision": summary["launch"]["mixed_precision"],
        "launch": summary["launch"],
    }


def run(ctx: StageContext) -> dict:
    tok_art, data_art = ctx.inputs["tokenizer"], ctx.inputs["prepare"]
    specs, tspec = ctx.specs, ctx.specs.train
    tokenizer = AutoTokenizer.from_pretrained(tok_art.path)
    vocab_size = check_lineage(tokenizer, tok_art, data_art)
    config = hf_config(specs.model, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = stops_at_end_of_turn(build_model(config, specs.seed, specs.model.zero_init_proj), tokenizer)

    windows = PackedWindows(open_split(data_art.path, "train"), tspec.seq_len, specs.seed)
    val_rows = eval_windows(open_split(data_art.path, "val"), tspec.seq_len, tspec.eval_tokens)
    pieces = token_byte_strings(tokenizer)
    references = compressor_references(pieces, val_rows[:, 1:].flatten().tolist())
    n_params, fpt = count_params(model), flops_per_token(model, tspec.seq_len)
    _log_plan(tspec, n_params, fpt, windows.num_windows, val_rows[:, 1:].numel(), references)

    def eval_batches(micro):
        return [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in val_rows.split(micro)]

    publish = partial(
        publish_pretrained, tokenizer=tokenizer, out=ctx.out, references=references, max_steps=tspec.max_steps
    )
    summary = run_training(ctx.training_job(model, tspec, pieces, windows.batch, eval_batches, fpt), publish)
    _log_result(summary, references, ctx.out / "model")
    warnings = training_warnings(summary, tspec, "train", references["gzip9_val_bpb"])
    for line in warnings:  # the stage's last words
        log.warning("pretrain: %s", line)
    return dict(_facts(summary, references, n_params, vocab_size, fpt), warnings=warnings)
