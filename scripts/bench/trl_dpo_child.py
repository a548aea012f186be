"""TRL's DPOTrainer + PEFT LoRA on preference pairs, timed the way pipeline's preference stage is:
non-padding tokens (chosen + rejected sequences) per second of training after the warm-up steps.
Run by trl_dpo.py with the python of an environment that has TRL (not a dependency of pipeline).
With --first-loss TOKENS --adapter DIR it only scores one batch: the given token ids (pipeline's
rendering of the same pairs) through TRL's own collator and loss, under that adapter."""

from __future__ import annotations

import json

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl_timing import train_timed, trainer_settings, trl_parser


def main() -> None:
    p = trl_parser(__doc__, lr=5e-4)  # the lr pipeline's side is given too
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--first-loss", help="JSON of [{prompt_ids, chosen_ids, rejected_ids}]: score it and stop")
    p.add_argument("--adapter", help="with --first-loss: the LoRA adapter to score under")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train")
    config = DPOConfig(
        **trainer_settings(args),
        beta=args.beta,
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
