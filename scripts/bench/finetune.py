"""LoRA fine-tuning throughput and peak memory of the pipeline's Trainer, as JSON.

    python scripts/bench/finetune.py                         # model=small (5.3M), the earlier quickstart shape
    python scripts/bench/finetune.py --model gpt2_124m --vocab 50304 --seq-len 1024 --micro-batch 8 \
        --batch-tokens 65536 --precision bf16                # one GPU

Random token rows of full length stand in for packed chat data (every token trained), so
tokens/s here is the packed-SFT rate; padded batches train fewer real tokens per second.

    python scripts/bench/finetune.py --model 350m --steps 2 --warmup 1 --micro-batch 1 --seq-len 64 \
        --batch-tokens 64 --checkpoint                      # what one LoRA checkpoint writes, and its time
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from common import (  # also puts the repo on sys.path
    device_name,
    model_spec,
    timed_tokens_per_s,
    train_spec,
    training_parser,
)

from pipeline.config.model import LoraSpec
from pipeline.model.build import build_model, count_params, hf_config
from pipeline.model.lora import apply_lora
from pipeline.train import checkpoints
from pipeline.train.choices import prepare_launch
from pipeline.train.loop import Trainer, TrainingJob
from pipeline.train.memory import peak_memory_gb


def main() -> None:
    p = training_parser(__doc__, steps=20, warmup=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpoint", action="store_true", help="also time one checkpoint (written, checksummed, sealed)")
    args = p.parse_args()

    spec = train_spec(args, lr=1e-3)
    model = apply_lora(build_model(hf_config(model_spec(args.model), args.vocab, 0, 1, 2), 0), LoraSpec(r=args.rank))
    gen = torch.Generator().manual_seed(0)

    def batch(first, size):
        ids = torch.randint(0, args.vocab, (size, args.seq_len + 1), generator=gen)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    with tempfile.TemporaryDirectory() as out:
        val = [batch(0, 2)]
        job = TrainingJob(model, spec, Path(out), "bench", batch, lambda micro: val)
        trainer = Trainer(job, prepare_launch(job))
        trainer.fit()
        tps = timed_tokens_per_s(trainer.metrics.rows(), args.warmup, spec.batch_tokens)
        saved = {}
        if args.checkpoint:
            t0 = time.perf_counter()
            state = {"step": args.steps, "fingerprint": "bench"}
            ckpt = checkpoints.save(trainer.strategy, Path(out) / "checkpoints", state, 1, None)
            saved = {"checkpoint_mb": round(checkpoints.size_of(ckpt) / 1e6, 1)}
            saved["checkpoint_s"] = round(time.perf_counter() - t0, 2)
    device = trainer.strategy.device
    print(
        json.dumps(
            {
                "model": args.model,
                "device": device_name(device),
                "precision": trainer.strategy.precision,
                "lora_rank": args.rank,
                "params": count_params(model),
                "trainable_params": count_params(model, True),
                "seq_len": args.seq_len,
                "batch_tokens": args.batch_tokens,
                "lora_tokens_per_s": round(tps, 1),
                "peak_mem_gb": round(peak_memory_gb(device), 3),
                **saved,
            }
        )
    )


if __name__ == "__main__":
    main()
