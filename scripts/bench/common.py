"""What the bench scripts share: the model/batch flags, a model from conf/model/, a TrainSpec,
and a child process's own wall time and peak memory."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config.model import ModelSpec  # noqa: E402
from pipeline.config.train import TrainSpec  # noqa: E402


def training_parser(doc: str, micro_batch: int = 16, steps: int = 30, warmup: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
    )
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=micro_batch)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup, help="steps left out of the timing (compile, caches)")
    p.add_argument(
        "--precision", default="auto", help="auto (CPU: measured, fp32 or bf16; GPU: bf16) | bf16 | fp16 | no"
    )
    return p


def model_spec(name: str) -> ModelSpec:
    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    cfg.pop("defaults", None)
    return ModelSpec(**cfg)


def train_spec(args, **overrides) -> TrainSpec:
    """A spec that logs every step and never evaluates or checkpoints mid-run (only timing counts)."""
    return TrainSpec(
        **{
            "max_steps": args.steps,
            "batch_tokens": args.batch_tokens,
            "micro_batch_size": args.micro_batch,
            "seq_len": args.seq_len,
            "mixed_precision": args.precision,
            "log_every": 1,
            "eval_every": 0,
            "ckpt_every": 0,
            "keep_checkpoints": 1,
            "warmup_steps": 2,
            **overrides,
        }
    )


def timed_tokens_per_s(rows: list[dict], warmup: int, batch_tokens: int) -> float:
    """Tokens/s over the logged steps after `warmup` (metrics.jsonl rows of a log_every=1 run)."""
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > warmup]
    return len(timed) * batch_tokens / sum(batch_tokens / r["tokens_per_s"] for r in timed)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or "cpu"


def run_child(cmd: list[str], what: str, **popen) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in GB) of a child process; the peak is the child's own
    (wait4), not the largest of every child this process ran."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **popen)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"{what} failed (wait status {status})")
    return out, time.perf_counter() - t0, usage.ru_maxrss / 1e6
