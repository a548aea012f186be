"""LoRA through PEFT: apply adapters, merge them into their base, and check an adapter fits a base."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.config.model import LoraSpec
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def apply_lora(model, spec: LoraSpec, new_token_ids: list[int] | None = None, seed: int = 0):
    """The model wrapped by PEFT with trainable LoRA weights; everything else is frozen, except the
    embedding (and untied output) rows of tokens added for the chat template, which must learn.
    The adapter's random start is drawn from `seed` (the same on every rank and at any process count)."""
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        task_type="CAUSAL_LM",
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
        trainable_token_indices=_token_rows(model, new_token_ids) if new_token_ids else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    for p in model.parameters():  # PEFT upcasts its adapters, not modules_to_save copies of a bf16 base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _token_rows(model, ids: list[int]) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices: the input embedding, plus the output head when it is not
    tied to it (PEFT ties the rows itself when it is)."""

    def name(layer):
        return next(n for n, m in model.named_modules() if m is layer).rsplit(".", 1)[-1]

    rows = {name(model.get_input_embeddings()): list(ids)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        rows[name(head)] = list(ids)
    return rows


def merge_adapter(base_model, adapter_dir: Path):
    """A plain model: the base with the saved adapter folded into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise PipelineError(
            f"{adapter_dir}/adapter_config.json names no base model; pass the base model dir explicitly."
        )
    return base


def _model_fingerprint(d: Path) -> tuple:
    return ((d / "config.json").read_text(), sorted((f.name, f.stat().st_size) for f in d.glob("*.safetensors")))


def check_adapter_base(model_dir: str, adapter_dir: str) -> None:
    """Refuse an adapter on a different base than the one it was trained on (as recorded with it)."""
    recorded, given = Path(adapter_base(Path(adapter_dir))), Path(model_dir)
    if not (recorded / "config.json").is_file():
        log.warning(
            "cannot check %s: its base %s is not here; make sure %s is that model", adapter_dir, recorded, given
        )
        return
    if recorded.resolve() != given.resolve() and _model_fingerprint(recorded) != _model_fingerprint(given):
        raise PipelineError(
            f"the adapter {adapter_dir} was trained on {recorded}, not on {given}; "
            f"use that base model (or fine-tune a new adapter for this one)."
        )
