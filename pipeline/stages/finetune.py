"""Stage `finetune`: LoRA (or full) supervised fine-tuning on chat data, loss on assistant tokens only."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.artifacts import canonical_hash
from pipeline.bpe import CHAT_TEMPLATE
from pipeline.data.chat import ChatSamples, build_examples, eval_batches, pack, show_trained_span
from pipeline.data.conversations import ChatDataSpec, load_conversations
from pipeline.errors import PipelineError
from pipeline.metrics import token_byte_strings
from pipeline.modeling import count_params, flops_per_token, load_causal_lm, load_tokenizer, publish_hf_dir
from pipeline.train_setup import TrainSpec
from pipeline.training import Trainer

NAME = "finetune"
DISTRIBUTED = True
KEEPS_WORK = True
UNTRACKED = ("checkpoints", "wandb", "tensorboard")
log = logging.getLogger("pipeline")


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # every linear of the blocks
    modules_to_save: list[str] | None = None  # e.g. [lm_head] to train it fully as well


@dataclass
class FinetuneSpec:
    base: str | None = None  # null: this run's pretrain/model; else a local HF dir (or hub name)
    method: str = "lora"  # lora | full
    merge: bool = True  # also write merged/: base + adapter as one plain HF model
    packing: bool = False
    trust_remote_code: bool = False
    data: ChatDataSpec = field(default_factory=ChatDataSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise PipelineError(f"finetune.method={self.method!r} is unknown; use lora or full.")


def upstream(cfg) -> list[str]:
    return [] if cfg.finetune.base else ["pretrain"]


def _base_fingerprint(base: str) -> dict:
    """An external base dir is an input too: its file names and sizes stand for its content."""
    p = Path(base).expanduser()
    files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()} if p.is_dir() else {}
    return {"path": str(p.resolve()) if p.is_dir() else base, "files": files}


def config_slice(cfg) -> dict:
    out = {"finetune": cfg.finetune, "seed": cfg.seed}
    if cfg.finetune.base:
        out["base"] = _base_fingerprint(cfg.finetune.base)
    return out


def _spec(cfg) -> FinetuneSpec:
    f = cfg.finetune
    return FinetuneSpec(
        base=f.base, method=f.method, merge=f.merge, packing=f.packing, trust_remote_code=f.trust_remote_code,
        data=ChatDataSpec(**f.data), lora=LoraSpec(**f.lora), train=TrainSpec(**f.train),
    )


def prepare_tokenizer(base: str, trust_remote_code: bool):
    tokenizer = load_tokenizer(base, trust_remote_code)
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using pipeline's (<|user|> ... <|end|>)", base)
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_lora(model, spec: LoraSpec):
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type="CAUSAL_LM",
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
    )
    return get_peft_model(model, config)


def check_adapter_saveable(trainer: Trainer) -> None:
    """Before training: PEFT must find the LoRA weights in the prepared model's state dict, or the
    saved adapter would be empty (accelerate's FSDP activation checkpointing renames modules)."""
    from peft import get_peft_model_state_dict

    if not get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model)):
        raise PipelineError(
            "PEFT finds no LoRA weights in the prepared model, so the adapter would be saved empty; with FSDP, "
            "set fsdp_activation_checkpointing: false in the accelerate config and use "
            "train.activation_checkpointing=true instead."
        )


def save_results(trainer: Trainer, tokenizer, spec: FinetuneSpec, base: str, out: Path) -> None:
    """adapter/ (PEFT) and/or merged/ (plain HF model), each with the tokenizer + chat template.

    Everything is written from the consolidated state dict, never from the live model, whose
    parameters may be shards (FSDP, ZeRO-3): merged/ is the base reloaded plus the saved adapter."""
    acc = trainer.accelerator
    state_dict = trainer.consolidated_state_dict()
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        if spec.method == "full":
            publish_hf_dir(model, tokenizer, out / "merged", state_dict)
        else:
            publish_hf_dir(model, tokenizer, out / "adapter", state_dict)
            if spec.merge:
                from peft import PeftModel

                base_model = load_causal_lm(base, spec.trust_remote_code)
                merged = PeftModel.from_pretrained(base_model, str(out / "adapter")).merge_and_unload()
                publish_hf_dir(merged, tokenizer, out / "merged")
    acc.wait_for_everyone()


def run(cfg, inputs: dict, out: Path) -> dict:
    spec = _spec(cfg)
    base = spec.base or str(inputs["pretrain"].path / "model")
    tokenizer = prepare_tokenizer(base, spec.trust_remote_code)
    model = load_causal_lm(base, spec.trust_remote_code)
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise PipelineError(
            f"the tokenizer in {base} has {len(tokenizer)} tokens but the model only {n_embed} embeddings; "
            f"use the tokenizer that came with the model."
        )
    tspec = spec.train
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and tspec.seq_len > max_pos:
        raise PipelineError(f"finetune.train.seq_len={tspec.seq_len} exceeds the model's {max_pos} positions; lower it.")

    train_convs, val_convs, counts = load_conversations(spec.data)
    train_ex, dropped = build_examples(tokenizer, train_convs, tspec.seq_len)
    val_ex, _ = build_examples(tokenizer, val_convs, tspec.seq_len)
    pad_id = tokenizer.pad_token_id
    log.info("finetune: one training example, trained tokens in [[ ]]:\n%s", show_trained_span(tokenizer, train_ex[0]))
    packed = pack(train_ex, tspec.seq_len, pad_id) if spec.packing else None
    samples = ChatSamples(train_ex, cfg.seed, pad_id, packed)

    fpt = flops_per_token(model, tspec.seq_len) if hasattr(model.config, "num_hidden_layers") else None
    if spec.method == "lora":
        model = apply_lora(model, spec.lora)
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    log.info(
        "finetune: %s on %s, %d/%d params trainable (%.2f%%), %d train / %d val conversations (%d too long, %d bad)%s",
        spec.method, base, trainable, total, 100 * trainable / total, len(train_ex), len(val_ex), dropped,
        counts["bad"], f", packed into {len(packed)} rows" if packed else "",
    )
    token_bytes = torch.tensor([len(p) for p in token_byte_strings(tokenizer)], dtype=torch.float64)
    fingerprint = canonical_hash({"config": config_slice(cfg), "inputs": {k: a.hash for k, a in inputs.items()}})
    trainer = Trainer(
        model, tspec, out, samples.batch, lambda micro: eval_batches(val_ex, pad_id, micro), fingerprint,
        token_bytes=token_bytes, resume=cfg.resume, trackers=tuple(cfg.logger.trackers),
        tracker_config=dict(tspec.__dict__), project=cfg.logger.project,
    )
    if spec.method == "lora":
        check_adapter_saveable(trainer)
    ds = trainer.accelerator.state.deepspeed_plugin if trainer.deepspeed else None
    if ds and ds.zero_stage == 3 and spec.method == "lora" and getattr(model.config, "tie_word_embeddings", False):
        log.warning("DeepSpeed ZeRO-3 with LoRA on a model with tied embeddings: gradients differ from a 1-process "
                    "run (the frozen tied weight; tests/test_sharded.py); prefer ZeRO-2 or FSDP for LoRA.")
    summary = trainer.fit(flops_per_token=fpt)
    save_results(trainer, tokenizer, spec, base, out)

    first, final = summary.get("initial", {}), summary.get("final", {})
    log.info(
        "finetune: val loss %.4f -> %.4f, val bpb %.4f -> %.4f, %.0f tokens/s -> %s",
        first.get("val_loss", float("nan")), final.get("val_loss", float("nan")),
        first.get("val_bpb", float("nan")), final.get("val_bpb", float("nan")), summary["tokens_per_s"], out,
    )
    return {
        "base": base,
        "method": spec.method,
        "trainable_params": trainable,
        "train_conversations": len(train_ex),
        "val_conversations": len(val_ex),
        "dropped_too_long": dropped,
        "skipped_bad": counts["bad"],
        "packed_rows": len(packed) if packed else None,
        "initial_val_loss": first.get("val_loss"),
        "initial_val_bpb": first.get("val_bpb"),
        "final_val_loss": final.get("val_loss"),
        "final_val_bpb": final.get("val_bpb"),
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "outputs": [d for d in ("adapter", "merged") if (out / d).is_dir()],
    }
