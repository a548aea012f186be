"""TRL's SFTTrainer + PEFT LoRA on a chat JSONL, timed the way pipeline's finetune is: non-padding
input tokens per second of training after the warm-up steps. Run by trl_compare.py with the
python of an environment that has TRL (TRL is not a dependency of pipeline). Each conversation
becomes a prompt (every turn before the last) and a completion (the last, the assistant's), so
only the answer is trained whatever the template (`assistant_only_loss` needs a template with
generation markers, which most models' own lack)."""

from __future__ import annotations

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl_timing import train_timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for flag in ("--base", "--data", "--out", "--precision"):
        p.add_argument(flag, required=True)
    for flag in ("--steps", "--warmup", "--seq-len", "--micro-batch", "--rank"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--packing", action="store_true")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train").map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}, remove_columns=["messages"]
    )
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_length=args.seq_len,
        packing=args.packing,
        completion_only_loss=True,
        bf16=args.precision == "bf16",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=1337,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on a CPU needs it said
    )
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    kwargs = dict(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    train_timed(SFTTrainer, args.warmup, **kwargs)


if __name__ == "__main__":
    main()
