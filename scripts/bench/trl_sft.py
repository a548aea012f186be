"""TRL's SFTTrainer + PEFT LoRA on a chat JSONL, timed the way pipeline's finetune is: non-padding
input tokens per second of training after the warm-up steps. Run by trl_compare.py with the
python of an environment that has TRL (TRL is not a dependency of pipeline). Each conversation
becomes a prompt (every turn before the last) and a completion (the last, the assistant's), so
only the answer is trained whatever the template (`assistant_only_loss` needs a template with
generation markers, which most models' own lack)."""

from __future__ import annotations

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl_timing import train_timed, trainer_settings, trl_parser


def main() -> None:
    p = trl_parser(__doc__, lr=2e-4)  # the lr pipeline's side is given too
    p.add_argument("--packing", action="store_true")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train").map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}, remove_columns=["messages"]
    )
    config = SFTConfig(
        **trainer_settings(args),
        packing=args.packing,
        completion_only_loss=True,
    )
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    kwargs = dict(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    train_timed(SFTTrainer, args.warmup, **kwargs)


if __name__ == "__main__":
    main()
