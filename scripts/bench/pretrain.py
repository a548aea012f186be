"""Pretraining throughput: the pipeline's Trainer vs a bare PyTorch loop on the same model and batches.

    python scripts/bench/pretrain.py --model small --steps 30                 # CPU, precision measured
    python scripts/bench/pretrain.py --model small --precision bf16           # CPU, bf16 autocast
    python scripts/bench/pretrain.py --model small --compile auto --run-minutes 60 --candidates
        # the pipeline's auto choices for an hour-long run, against a bare loop of every candidate
    python scripts/bench/pretrain.py --model gpt2_124m --vocab 50304 --seq-len 1024 \
        --micro-batch 16 --batch-tokens 524288 --precision bf16 --compile true  # one GPU

Prints one JSON object: tokens/s of both loops, their ratio, MFU (GPU), peak memory, and the CPU
or GPU it ran on. Random tokens stand in for data: throughput does not depend on what they are.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (  # also puts the repo on sys.path
    device_name,
    model_spec,
    timed_tokens_per_s,
    train_spec,
    training_parser,
)

from pipeline.config.train import TrainSpec
from pipeline.data.shards import TokenShards
from pipeline.data.windows import PackedWindows
from pipeline.device import resolve_mixed_precision
from pipeline.model.build import build_model, count_params, flops_per_token, hf_config
from pipeline.train.choices import prepare_launch
from pipeline.train.layout import batch_layout
from pipeline.train.loop import Trainer, TrainingJob
from pipeline.train.loss import is_compiled
from pipeline.train.memory import peak_memory_gb
from pipeline.train.optim import lr_at, make_optimizer
from pipeline.train.throughput import peak_flops


def bare_loop(
    args, spec: TrainSpec, windows: PackedWindows, device: torch.device, precision: str, compile: bool
) -> float:
    """The reference: forward, cross entropy, backward, clip, AdamW; compiled, the model and the
    loss are one graph. Returns tokens/s after warmup."""
    model = build_model(hf_config(model_spec(args.model), args.vocab, 0, 1, 2), 0).to(device)
    opt = make_optimizer(model, spec, fused=device.type == "cuda")

    def step_loss(x, y):
        return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())

    loss_fn = torch.compile(step_loss) if compile else step_loss
    _, micro, accum = batch_layout(spec, world=1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
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
                loss = loss_fn(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the pipeline reads the loss every step too (log_every=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (args.steps - args.warmup) * spec.batch_tokens / (time.perf_counter() - start)


def bare_candidates(args, spec, windows, device) -> dict[str, float]:
    """Every candidate the pipeline chooses among, as a bare loop: tokens/s by 'precision+mode'."""
    precisions = ["no", "bf16"] if device.type == "cpu" else [resolve_mixed_precision("auto")]
    return {
        f"{p}+{'compiled' if c else 'eager'}": round(bare_loop(args, spec, windows, device, p, c), 1)
        for p in precisions
        for c in (False, True)
    }


def pipeline_loop(args, spec: TrainSpec, windows: PackedWindows) -> tuple[float, Trainer]:
    model = build_model(hf_config(model_spec(args.model), args.vocab, 0, 1, 2), 0)
    val = windows.batch(0, spec.micro_batch_size)
    with tempfile.TemporaryDirectory() as out:
        job = TrainingJob(
            model,
            spec,
            Path(out),
            "bench",
            windows.batch,
            lambda micro: [val],
            flops_per_token=flops_per_token(model, spec.seq_len),
        )
        trainer = Trainer(job, prepare_launch(job))
        trainer.fit()
        tps = timed_tokens_per_s(trainer.metrics.rows(), args.warmup, spec.batch_tokens)
    return tps, trainer


def main() -> None:
    p = training_parser(__doc__)
    p.add_argument(
        "--compile",
        default="false",
        choices=["true", "false", "auto"],
        help="the pipeline's train.compile (auto: measured, where the run is long enough)",
    )
    p.add_argument(
        "--run-minutes",
        type=float,
        default=None,
        help="tell the pipeline the run is this long (a time budget capped at --steps), so auto "
        "choices are made as in a run of that length",
    )
    p.add_argument("--skip-bare", action="store_true", help="time only the pipeline")
    p.add_argument(
        "--candidates",
        action="store_true",
        help="time the bare loop for every candidate (fp32/bf16 x eager/compiled on a CPU)",
    )
    args = p.parse_args()

    compile = {"true": True, "false": False}.get(args.compile, "auto")
    budget = {"time_budget": f"{args.run_minutes}min", "warmup_steps": args.warmup} if args.run_minutes else {}
    spec = train_spec(args, compile=compile, **budget)
    rng = np.random.default_rng(0)
    n = max(args.steps * args.batch_tokens + args.seq_len + 1, 1 << 20)
    windows = PackedWindows(TokenShards([rng.integers(0, args.vocab, n, dtype=np.int64)]), args.seq_len, 0)

    pipe_tps, trainer = pipeline_loop(args, spec, windows)
    device = trainer.strategy.device
    fpt = trainer.job.flops_per_token
    result = {
        "model": args.model,
        "params": count_params(trainer.model),
        "device": device_name(device),
        "precision": trainer.strategy.precision,
        "compiled": is_compiled(trainer.loss),
        "precision_choice": trainer.choices.precision,
        "compile_choice": trainer.choices.compile,
        "seq_len": args.seq_len,
        "batch_tokens": args.batch_tokens,
        "micro_batch": trainer.layout.micro,
        "pipeline_tokens_per_s": round(pipe_tps, 1),
        "peak_mem_gb": round(peak_memory_gb(device), 3),
    }
    peak = peak_flops(device, trainer.strategy.precision)
    if peak:
        result["pipeline_mfu"] = round(fpt * pipe_tps / peak, 4)
    if args.candidates:
        bare = bare_candidates(args, spec, windows, device)
        fastest = max(bare, key=bare.get)
        result.update(
            bare_tokens_per_s=bare, bare_fastest=fastest, pipeline_vs_fastest_bare=round(pipe_tps / bare[fastest], 4)
        )
        if "no+eager" in bare:
            result["pipeline_vs_bare_fp32_eager"] = round(pipe_tps / bare["no+eager"], 4)
    elif not args.skip_bare:
        precision, compiled = trainer.strategy.precision, result["compiled"]
        bare_tps = bare_loop(args, spec, windows, device, precision, compiled)
        result["bare_tokens_per_s"] = round(bare_tps, 1)
        result["pipeline_vs_bare"] = round(pipe_tps / bare_tps, 4)
        if peak:
            result["bare_mfu"] = round(fpt * bare_tps / peak, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
