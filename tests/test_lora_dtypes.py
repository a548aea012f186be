"""LoRA's dtypes: a bf16 frozen base on a GPU (fp32 adapters), merged/ in the base's own dtype,
and flash-attention's varlen kernel for packed rows where it is installed."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipeline.config.model import LoraSpec
from pipeline.config.run import FinetuneSpec
from pipeline.config.train import TrainSpec
from pipeline.model import hf_dir
from pipeline.model.lora import apply_lora
from tests.chat_families import FAMILIES, conversations, make_base, write_chats
from tests.conftest import run_cli


@pytest.fixture
def gpu_bf16(monkeypatch):
    """What the stage sees on a bf16 GPU, without one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hf_dir, "resolve_mixed_precision", lambda choice: "bf16" if choice == "auto" else choice)
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)


def test_the_frozen_base_is_bf16_only_for_lora_on_a_bf16_gpu_without_sharding(gpu_bf16, monkeypatch):
    assert hf_dir.frozen_base_dtype(FinetuneSpec()) == torch.bfloat16
    assert hf_dir.frozen_base_dtype(FinetuneSpec(method="full")) == torch.float32  # fp32 master weights
    assert hf_dir.frozen_base_dtype(FinetuneSpec(train=TrainSpec(mixed_precision="no"))) == torch.float32
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert hf_dir.frozen_base_dtype(FinetuneSpec()) == torch.float32  # FSDP flattens one dtype per unit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert hf_dir.frozen_base_dtype(FinetuneSpec()) == torch.float32  # a CPU measures its precision later


def test_packed_rows_use_flash_attention_only_where_it_is_installed(gpu_bf16, monkeypatch):
    installed = {"flash_attn": True}
    monkeypatch.setattr(hf_dir.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    assert hf_dir.packed_attention(FinetuneSpec(packing=True)) == "flash_attention_2"
    assert hf_dir.packed_attention(FinetuneSpec(packing=False)) is None
    installed["flash_attn"] = False
    assert hf_dir.packed_attention(FinetuneSpec(packing=True)) is None  # SDPA, block-diagonal mask


def test_lora_on_a_bf16_base_trains_fp32_adapters_and_rows(tmp_path):
    base = make_base(FAMILIES["llama3"], tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = apply_lora(model, LoraSpec(modules_to_save=["lm_head"]), new_token_ids=[3, 4])
    trainable = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert frozen == {torch.bfloat16}


@pytest.mark.slow
def test_merged_model_is_written_in_the_base_dtype(tmp_path):
    family = FAMILIES["qwen2_5"]
    base = make_base(family, tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)  # a bf16 release
    data = write_chats(tmp_path / "chat.jsonl", conversations(120))
    run_cli(
        "recipe=lora_qwen2_5",
        "run.name=ft",
        f"finetune.base={base}",
        f"finetune.data.paths=[{data}]",
        "finetune.train.max_steps=2",
        "finetune.train.warmup_steps=1",
        "finetune.train.seq_len=96",
        "finetune.train.micro_batch_size=8",
        "finetune.train.batch_tokens=768",
        "finetune.train.eval_every=0",
        "finetune.train.mixed_precision=no",
        cwd=tmp_path,
    )
    with safe_open(tmp_path / "runs/ft/finetune/merged/model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}  # not an fp32 copy twice the size of its base
