"""TRL's DPOTrainer + PEFT LoRA on preference pairs, timed the way pipeline's preference stage is:
non-padding tokens (chosen + rejected sequences) per second of training after the warm-up steps.
Run by trl_dpo.py with the python of an environment that has TRL (not a dependency of pipeline).
With --first-loss TOKENS --adapter DIR it only scores one batch: the given token ids (pipeline's
rendering of the same pairs) through TRL's own collator and loss, under that adapter."""

from __future__ import annotations

import argparse
import json

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl_timing import train_timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for flag in ("--base", "--data", "--out", "--precision"):
        p.add_argument(flag, required=True)
    for flag in ("--steps", "--warmup", "--seq-len", "--micro-batch", "--rank"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--first-loss", help="JSON of [{prompt_ids, chosen_ids, rejected_ids}]: score it and stop")
    p.add_argument("--adapter", help="with --first-loss: the LoRA adapter to score under")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train")
    config = DPOConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_length=args.seq_len,
        beta=args.beta,
        bf16=args.precision == "bf16",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=1337,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if args.first_loss:
        model = PeftModel.from_pretrained(model, args.adapter)
        trainer = DPOTrainer(model=model, args=config, train_dataset=data.select(range(4)), processing_class=tokenizer)
        # Given a trained adapter, TRL's reference is a frozen copy of it ("ref"); without that copy it is
        # the base with adapters disabled, as in training a new adapter (and in pipeline's stage).
        trainer.model.delete_adapter("ref")
        batch = trainer.data_collator(json.loads(open(args.first_loss).read()))
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        print(json.dumps({"loss": float(loss)}))
        return

    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    kwargs = dict(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    train_timed(DPOTrainer, args.warmup, **kwargs)


if __name__ == "__main__":
    main()
