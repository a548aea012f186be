"""Stage `pretrain`: train a causal LM from scratch on the token shards; save an HF model dir."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipeline.artifacts import Artifact, canonical_hash
from pipeline.bpe import END_OF_TURN
from pipeline.data.shards import open_split
from pipeline.data.windows import PackedWindows, eval_windows
from pipeline.errors import PipelineError
from pipeline.metrics import gzip_bits_per_byte, plot_curves, token_byte_strings
from pipeline.modeling import ModelSpec, build_model, count_params, flops_per_token, hf_config, publish_hf_dir
from pipeline.train_setup import TrainSpec
from pipeline.training import Trainer

NAME = "pretrain"
DISTRIBUTED = True  # every rank trains; the runner publishes from the main process
KEEPS_WORK = True  # checkpoints survive a crash so the next run resumes
UNTRACKED = ("checkpoints", "wandb", "tensorboard")
log = logging.getLogger("pipeline")


def upstream(cfg) -> list[str]:
    return ["tokenizer", "prepare"]


def config_slice(cfg) -> dict:
    return {"model": dict(cfg.model), "train": dict(cfg.train), "seed": cfg.seed}


def check_lineage(tokenizer, tok: Artifact, data: Artifact) -> int:
    """The shards must come from this tokenizer, and every size must agree; returns the vocab size."""
    if data.manifest["inputs"].get("tokenizer", {}).get("manifest_hash") != tok.hash:
        raise PipelineError(
            f"{data.path} was tokenized with another tokenizer than {tok.path}; rerun `pipeline stage=prepare`."
        )
    sizes = {"tokenizer": len(tokenizer), "shards": data.facts["vocab_size"], "tokenizer manifest": tok.facts["vocab_size"]}
    if len(set(sizes.values())) != 1:
        raise PipelineError(f"vocabulary sizes disagree ({sizes}); rebuild with `pipeline stage=prepare force=true`.")
    return len(tokenizer)


def eval_batches_from(rows: torch.Tensor, micro: int) -> list[dict]:
    return [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows.split(micro)]


def save_hf_model(trainer: Trainer, tokenizer, out: Path) -> None:
    """Consolidate (FSDP/DeepSpeed-safe) and write a plain HF model + tokenizer dir, atomically."""
    acc = trainer.accelerator
    state_dict = trainer.consolidated_state_dict()
    if acc.is_main_process:
        publish_hf_dir(acc.unwrap_model(trainer.model), tokenizer, out, state_dict)
    acc.wait_for_everyone()


def run(cfg, inputs: dict, out: Path) -> dict:
    tok_art, data_art = inputs["tokenizer"], inputs["prepare"]
    tokenizer = AutoTokenizer.from_pretrained(tok_art.path)
    vocab_size = check_lineage(tokenizer, tok_art, data_art)
    mspec, tspec = ModelSpec(**cfg.model), TrainSpec(**cfg.train)
    if tspec.seq_len > mspec.max_seq_len:
        raise PipelineError(
            f"train.seq_len={tspec.seq_len} exceeds model.max_seq_len={mspec.max_seq_len}; lower one or raise the other."
        )
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = hf_config(mspec, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = build_model(config, cfg.seed)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    windows = PackedWindows(open_split(data_art.path, "train"), tspec.seq_len, cfg.seed)
    val_rows = eval_windows(open_split(data_art.path, "val"), tspec.seq_len, tspec.eval_tokens)
    pieces = token_byte_strings(tokenizer)
    token_bytes = torch.tensor([len(p) for p in pieces], dtype=torch.float64)
    reference = gzip_bits_per_byte(b"".join(pieces[t] for t in val_rows[:, 1:].flatten().tolist()))

    n_params, fpt = count_params(model), flops_per_token(model, tspec.seq_len)
    budget = tspec.max_steps * tspec.batch_tokens
    log.info(
        "pretrain: %.2fM params, %.1f MFLOPs/token, %d steps x %d tokens = %.1fM tokens (%.1f tokens/param), "
        "%d train windows, %d val tokens",
        n_params / 1e6, fpt / 1e6, tspec.max_steps, tspec.batch_tokens, budget / 1e6, budget / n_params,
        windows.num_windows, val_rows[:, 1:].numel(),
    )
    log.info("reference: gzip -9 compresses the same validation text to %.4f bits/byte", reference)
    fingerprint = canonical_hash({"config": config_slice(cfg), "inputs": {k: a.hash for k, a in inputs.items()}})
    trainer = Trainer(
        model, tspec, out, windows.batch, lambda micro: eval_batches_from(val_rows, micro), fingerprint,
        token_bytes=token_bytes, resume=cfg.resume, trackers=tuple(cfg.logger.trackers),
        tracker_config=dict(cfg.train), project=cfg.logger.project,
    )
    summary = trainer.fit(flops_per_token=fpt)
    save_hf_model(trainer, tokenizer, out / "model")

    final = summary.get("final", {})
    if trainer.accelerator.is_main_process:
        trainer.metrics.write({"step": summary["steps"], "reference": "gzip -9", "gzip_bpb": reference})
        plot_curves(trainer.metrics.rows(), out / "curves.png", reference)
        verdict = "below" if final.get("val_bpb", 99) < reference else "NOT below"
        log.info(
            "pretrain: val bpb %.4f (%s gzip -9 at %.4f), val loss %.4f, %.0f tokens/s -> %s",
            final.get("val_bpb", float("nan")), verdict, reference, final.get("val_loss", float("nan")),
            summary["tokens_per_s"], out / "model",
        )
    return {
        "params": n_params,
        "vocab_size": vocab_size,
        "flops_per_token": fpt,
        "tokens_seen": summary["tokens_seen"],
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_val_loss": final.get("val_loss"),
        "final_val_bpb": final.get("val_bpb"),
        "gzip9_val_bpb": reference,
        "processes": trainer.world,
        "mixed_precision": trainer.accelerator.mixed_precision,
    }
