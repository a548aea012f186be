"""Pretraining throughput: the pipeline's Trainer vs a bare PyTorch loop on the same model and batches.

    python scripts/bench/pretrain.py --model small --steps 30                 # CPU, bf16 autocast
    python scripts/bench/pretrain.py --model small --precision no             # CPU, fp32
    python scripts/bench/pretrain.py --model gpt2_124m --vocab 50304 --seq-len 1024 \
        --micro-batch 16 --batch-tokens 524288 --precision bf16 --compile       # one GPU

Prints one JSON object: tokens/s of both loops, their ratio, MFU (GPU), peak memory.
Random tokens stand in for data: throughput does not depend on what the tokens are.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.data.shards import TokenShards  # noqa: E402
from pipeline.data.windows import PackedWindows  # noqa: E402
from pipeline.metrics import peak_flops, peak_memory_gb  # noqa: E402
from pipeline.modeling import ModelSpec, build_model, count_params, flops_per_token, hf_config  # noqa: E402
from pipeline.train_setup import TrainSpec, lr_at, make_optimizer, resolve_mixed_precision  # noqa: E402
from pipeline.training import Trainer  # noqa: E402


def model_spec(name: str) -> ModelSpec:
    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    cfg.pop("defaults", None)
    return ModelSpec(**cfg)


def bare_loop(args, spec: TrainSpec, windows: PackedWindows, device: torch.device) -> float:
    """The reference: forward, cross entropy, backward, clip, AdamW. Returns tokens/s after warmup."""
    model = build_model(hf_config(model_spec(args.model), args.vocab, 0, 1, 2), 0).to(device)
    opt = make_optimizer(model, spec, fused=device.type == "cuda")
    fwd = torch.compile(model) if args.compile else model
    micro = spec.micro_batch_size
    accum = spec.batch_tokens // spec.seq_len // micro
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(args.precision))
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        for m in range(accum):
            b = windows.batch((step * accum + m) * micro, micro)
            x, y = b["input_ids"].to(device), b["labels"].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = fwd(input_ids=x).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the pipeline reads the loss every step too
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (args.steps - args.warmup) * spec.batch_tokens / (time.perf_counter() - start)


def pipeline_loop(args, spec: TrainSpec, windows: PackedWindows) -> tuple[float, Trainer]:
    model = build_model(hf_config(model_spec(args.model), args.vocab, 0, 1, 2), 0)
    val = windows.batch(0, spec.micro_batch_size)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, spec, Path(out), windows.batch, [val], fingerprint="bench")
        trainer.fit(flops_per_token(model, spec.seq_len))
        rows = [r for r in trainer.metrics.rows() if "tokens_per_s" in r and r["step"] > args.warmup]
    seconds = sum(spec.batch_tokens / r["tokens_per_s"] for r in rows)
    return len(rows) * spec.batch_tokens / seconds, trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (compile, caches)")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | no")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--skip-bare", action="store_true", help="time only the pipeline")
    args = p.parse_args()

    spec = TrainSpec(
        max_steps=args.steps, batch_tokens=args.batch_tokens, micro_batch_size=args.micro_batch,
        seq_len=args.seq_len, mixed_precision=args.precision, compile=args.compile, log_every=1,
        eval_every=0, ckpt_every=0, keep_checkpoints=1, warmup_steps=2,
    )
    rng = np.random.default_rng(0)
    n = max(args.steps * args.batch_tokens + args.seq_len + 1, 1 << 20)
    windows = PackedWindows(TokenShards([rng.integers(0, args.vocab, n, dtype=np.int64)], args.vocab, 1), args.seq_len, 0)

    pipe_tps, trainer = pipeline_loop(args, spec, windows)
    device = trainer.accelerator.device
    model = trainer.accelerator.unwrap_model(trainer.model)
    fpt = flops_per_token(model, args.seq_len)
    result = {
        "model": args.model, "params": count_params(model), "device": str(device),
        "precision": trainer.accelerator.mixed_precision, "compile": args.compile,
        "seq_len": args.seq_len, "batch_tokens": args.batch_tokens, "micro_batch": trainer.micro,
        "pipeline_tokens_per_s": round(pipe_tps, 1),
        "peak_mem_gb": round(peak_memory_gb(device), 3),
    }
    peak = peak_flops(device)
    if peak:
        result["pipeline_mfu"] = round(fpt * pipe_tps / peak, 4)
    if not args.skip_bare:
        bare_tps = bare_loop(args, spec, windows, device)
        result["bare_tokens_per_s"] = round(bare_tps, 1)
        result["pipeline_vs_bare"] = round(pipe_tps / bare_tps, 4)
        if peak:
            result["bare_mfu"] = round(fpt * bare_tps / peak, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
