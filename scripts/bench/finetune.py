"""LoRA fine-tuning throughput and peak memory of the pipeline's Trainer, as JSON.

    python scripts/bench/finetune.py                         # the CPU quickstart shape (5.3M model)
    python scripts/bench/finetune.py --model gpt2_124m --vocab 50304 --seq-len 1024 --micro-batch 8 \
        --batch-tokens 65536 --precision bf16                # one GPU

Random token rows of full length stand in for packed chat data (every token trained), so
tokens/s here is the packed-SFT rate; padded batches train fewer real tokens per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain import model_spec  # noqa: E402

from pipeline.metrics import peak_memory_gb  # noqa: E402
from pipeline.modeling import build_model, count_params, hf_config  # noqa: E402
from pipeline.stages.finetune import LoraSpec, apply_lora  # noqa: E402
from pipeline.train_setup import TrainSpec  # noqa: E402
from pipeline.training import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--precision", default="auto")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()

    spec = TrainSpec(max_steps=args.steps, batch_tokens=args.batch_tokens, micro_batch_size=args.micro_batch,
                     seq_len=args.seq_len, mixed_precision=args.precision, log_every=1, eval_every=0,
                     ckpt_every=0, keep_checkpoints=1, warmup_steps=2, lr=1e-3)
    model = apply_lora(build_model(hf_config(model_spec(args.model), args.vocab, 0, 1, 2), 0), LoraSpec(r=args.rank))
    gen = torch.Generator().manual_seed(0)

    def batch(first, size):
        ids = torch.randint(0, args.vocab, (size, args.seq_len + 1), generator=gen)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, spec, Path(out), batch, [batch(0, 2)], fingerprint="bench")
        trainer.fit()
        rows = [r for r in trainer.metrics.rows() if "tokens_per_s" in r and r["step"] > args.warmup]
    seconds = sum(spec.batch_tokens / r["tokens_per_s"] for r in rows)
    device = trainer.accelerator.device
    print(json.dumps({
        "model": args.model, "device": str(device), "precision": trainer.accelerator.mixed_precision,
        "lora_rank": args.rank, "params": count_params(model), "trainable_params": count_params(model, True),
        "seq_len": args.seq_len, "batch_tokens": args.batch_tokens,
        "lora_tokens_per_s": round(len(rows) * spec.batch_tokens / seconds, 1),
        "peak_mem_gb": round(peak_memory_gb(device), 3),
    }))


if __name__ == "__main__":
    main()
