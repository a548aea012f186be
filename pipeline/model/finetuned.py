"""Publishing a fine-tuned model: adapter/ (the LoRA weights) and/or merged/ (a plain full model)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.run import FinetuneSpec
from pipeline.model.hf_dir import grow_vocab, load_causal_lm, publish_hf_dir
from pipeline.model.lora import merge_adapter
from pipeline.model.tokenizer import stops_at_end_of_turn


def publish_finetuned(trained, state_dict: dict, tokenizer, out_dir: Path, spec: FinetuneSpec, base: str) -> None:
    """adapter/ and/or merged/ under `out_dir`, each with the tokenizer + chat template, from the
    consolidated weights (never the live model, whose parameters may be shards): merged/ is the
    base reloaded plus the saved adapter."""
    if spec.method == "full":
        publish_hf_dir(stops_at_end_of_turn(trained, tokenizer), tokenizer, out_dir / "merged", state_dict)
        return
    publish_hf_dir(trained, tokenizer, out_dir / "adapter", state_dict)
    if spec.merge:
        # unquantized, in the base's own dtype: merged/ is a plain full model the size of its base
        reloaded = load_causal_lm(base, spec.trust_remote_code, dtype="auto")
        grow_vocab(reloaded, tokenizer)
        merged = merge_adapter(reloaded, out_dir / "adapter")
        publish_hf_dir(stops_at_end_of_turn(merged, tokenizer), tokenizer, out_dir / "merged")
