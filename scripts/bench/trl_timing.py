"""What the TRL side of the comparisons (trl_sft.py, trl_dpo_child.py) shares: its flags, the
trainer settings both use, and the timing: a trainer that counts the non-padding tokens each step
feeds it and the first loss, a clock at every step's end, and one JSON line of results. Imported
only with TRL installed."""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import TrainerCallback


def trl_parser(doc: str, lr: float) -> argparse.ArgumentParser:
    """The flags both TRL children take (the driver passes the same ones to each)."""
    p = argparse.ArgumentParser(description=doc)
    for flag in ("--base", "--data", "--out", "--precision"):
        p.add_argument(flag, required=True)
    for flag in ("--steps", "--warmup", "--seq-len", "--micro-batch", "--rank"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--lr", type=float, default=lr)
    return p


def trainer_settings(args) -> dict:
    """The TrainingArguments both comparisons give TRL: the batch, schedule, precision and length
    of pipeline's run; no saving, logging or workers that would take time from training."""
    return dict(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_length=args.seq_len,
        bf16=args.precision == "bf16",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=1337,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on a CPU needs it said
    )


def train_timed(trainer_class, warmup: int, **trainer_kwargs) -> None:
    """Train a `trainer_class` (TRL's SFTTrainer or DPOTrainer) and print tokens/s after `warmup`
    steps, the first step's loss and the setup that decides speed."""
    seen, marks, first_loss = {"tokens": 0}, [], []

    class Counting(trainer_class):
        def compute_loss(self, model, inputs, *a, **kw):
            mask = inputs.get("attention_mask")
            seen["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            loss = super().compute_loss(model, inputs, *a, **kw)
            if not first_loss:
                first_loss.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            marks.append((time.perf_counter(), seen["tokens"]))

    trainer = Counting(callbacks=[Clock()], **trainer_kwargs)
    trainer.train()
    (t0, n0), (t1, n1) = marks[warmup - 1], marks[-1]
    print(
        json.dumps(
            {
                "tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
                "steps": len(marks),
                "first_loss": round(first_loss[0], 4),
                "activation_checkpointing": trainer.args.gradient_checkpointing,
                "threads": torch.get_num_threads(),
                "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            }
        )
    )
