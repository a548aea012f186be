"""Measurements of the machine that start-of-run choices are made from (train/choices.py):
`mixed_precision=auto`, `compile=auto`, `micro_batch_size=auto` and the step count of
`train.time_budget`.

Precision: on a CPU, bf16 autocast is 1.5x faster than fp32 on one x86 vendor and slower on
another, so a few timed forward+backward passes of the real model on a real batch decide. The
weights, gradients and RNG are left as they were: the run trains exactly as with the explicit
choice. A run too short to repay the measurement (over 5% of it) uses fp32 without measuring.
"""

from __future__ import annotations

import logging
import statistics
import time
from contextlib import nullcontext

import psutil
import torch

from pipeline.device import half_precision
from pipeline.train.loss import token_losses
from pipeline.train.preflight import activation_bytes, divisors_desc, find_micro_batch

log = logging.getLogger("pipeline")
MEASURE_SHARE = 0.05  # the measurement may cost at most this share of the run
TIMED_PASSES = 3  # per candidate, after one warm-up pass each
MARGIN = 0.05  # a half precision or compiling must be this much faster to be chosen (near-ties are noise)
# What compiling forward+backward may take before it is known: a cold compile (empty inductor
# cache) of the 5M quickstart model took 23-28 s on cpu-2c-amd. Trying is only worth a run 20x longer.
COMPILE_PRIOR_SECONDS = {"cpu": 30.0, "cuda": 60.0}


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _timed(losses, device: torch.device) -> float:
    """Seconds of one forward (`losses()`) and backward."""
    t0 = time.perf_counter()
    losses().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _timed_pass(model, batch: dict, device: torch.device, precision: str, chunk_tokens) -> float:
    def losses():
        with _autocast(device, precision):
            return token_losses(model, batch, chunk_tokens)

    seconds = _timed(losses, device)
    model.zero_grad(set_to_none=True)
    return seconds


def candidates(device: torch.device) -> list[str]:
    """Where the answer is known it is not measured: a CUDA GPU uses bf16 (fp16 before Ampere)."""
    if device.type == "cpu":
        return ["no", "bf16"]
    half = half_precision(device) if device.type == "cuda" else None
    return [half or "no"]


def measure_precision(
    model,
    batch: dict,
    device: torch.device,
    run_passes: int | None,
    run_seconds: float | None,
    loss_chunk_tokens: int | str = 0,
) -> dict:
    """{"choice": precision, "seconds": {precision: median seconds per pass}, ...}. The run's
    length is given in forward+backward passes or in seconds (a time budget); the passes compute
    the loss as training will (train.loss_chunk_tokens)."""
    options = candidates(device)
    if len(options) == 1:
        return {"choice": options[0], "measured": False}
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _timed_pass(model, batch, device, options[0], loss_chunk_tokens)  # warm-up: the first pass pays for allocations
        first = _timed_pass(model, batch, device, options[0], loss_chunk_tokens)
        total = run_seconds if run_seconds is not None else first * (run_passes or 0)
        cost = first * (len(options) * (TIMED_PASSES + 1) - 1)  # what measuring all of them would add
        if cost > MEASURE_SHARE * total:
            model.train(was_training)
            return {"choice": "no", "measured": False, "reason": f"run too short to measure (~{cost:.1f}s)"}
        for precision in list(options[1:]):
            try:
                _timed_pass(model, batch, device, precision, loss_chunk_tokens)  # warm-up
            except RuntimeError as e:  # an op without a kernel for this type here
                log.info("precision: %s does not run here (%s)", precision, str(e).splitlines()[0][:120])
                model.zero_grad(set_to_none=True)
                options.remove(precision)
        times = {p: [first] if p == options[0] else [] for p in options}
        for round_ in range(TIMED_PASSES):
            for precision in options:  # interleaved, so drift in machine speed hits all alike
                if round_ or precision != options[0]:
                    times[precision].append(_timed_pass(model, batch, device, precision, loss_chunk_tokens))
    model.train(was_training)
    seconds = {p: round(statistics.median(t), 4) for p, t in times.items()}
    fastest = min(seconds, key=seconds.get)
    choice = fastest if seconds[fastest] < (1 - MARGIN) * seconds["no"] else "no"
    return {"choice": choice, "measured": True, "seconds": seconds}


def measure_compile(
    eager,
    compiled,
    model,
    device: torch.device,
    run_passes: int,
    run_seconds: float | None,
    agree=lambda decision: decision,
) -> dict:
    """{"choice": compile or not, "seconds": {eager, compiled}, ...}: forward+backward passes of
    `eager()` and `compiled()` (the same losses) timed in turns after compiling. Compiling is only
    tried when COMPILE_PRIOR_SECONDS is at most MEASURE_SHARE of the run (given in passes or
    seconds). `agree` makes every process take rank 0's decision (their passes must match)."""
    prior = COMPILE_PRIOR_SECONDS.get(device.type)
    if prior is None:
        return {"choice": False, "measured": False, "reason": f"not tried on {device.type}"}
    times = {"eager": [], "compiled": []}
    was_training = model.training
    model.train()  # as training calls it: dropout on, and the graph compiled is the one training uses
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _timed(eager, device)  # warm-up
        times["eager"].append(_timed(eager, device))
        total = run_seconds if run_seconds is not None else times["eager"][0] * run_passes
        if not agree(prior <= MEASURE_SHARE * total):
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            return {
                "choice": False,
                "measured": False,
                "reason": f"a run of ~{total:.0f}s is too short to repay trying: compiling may take ~{prior:.0f}s",
            }
        compile_seconds = _timed(compiled, device)
        for _ in range(TIMED_PASSES):  # in turns, so drift in machine speed hits both alike
            times["compiled"].append(_timed(compiled, device))
            times["eager"].append(_timed(eager, device))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    seconds = {k: round(statistics.median(t), 4) for k, t in times.items()}
    return {
        "choice": seconds["compiled"] < (1 - MARGIN) * seconds["eager"],
        "measured": True,
        "seconds": seconds,
        "compile_seconds": round(compile_seconds, 1),
    }


def measure_micro_batch(
    model, *, seq_len: int, per_rank: int, device: torch.device, autocast, half: bool, chunk_tokens, checkpointing: bool
) -> int:
    """The largest micro-batch (a divisor of this rank's sequences per step) that fits. GPUs probe a
    real forward+backward with OOM back-off; CPUs cap it at a quarter of free RAM by the activation
    estimate (an OOM there kills the process instead of raising). `autocast()`: the launch's, and
    `half` whether it computes in 16 bits."""
    cfg = model.config

    def act(size):
        return activation_bytes(
            cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, size * seq_len, half, checkpointing
        )

    cap = None
    if device.type == "cpu":
        free = psutil.virtual_memory().available
        cap = max([d for d in divisors_desc(per_rank) if act(d) <= free / 4] or [1])
    if not getattr(model, "hf_device_map", None):  # a quantized base is placed when loaded
        model.to(device)
    gen = torch.Generator().manual_seed(0)

    def probe(size):
        ids = torch.randint(0, cfg.vocab_size, (size, seq_len + 1), generator=gen).to(device)
        with autocast():
            loss = token_losses(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, chunk_tokens).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return find_micro_batch(per_rank, probe, cap)


class TimeBudget:
    """The step count of a run given in wall time (train.time_budget), fixed early: from the time
    per step over the first few steps (the first one, with its warm-up, excluded), the time of an
    evaluation, and the time spent since the trainer started. The learning-rate schedule is still
    in warmup then, so the decay spans exactly the steps decided; they are stored with checkpoints."""

    def __init__(
        self,
        seconds: float,
        started: float,
        warmup_steps: int,
        eval_every: int,
        start_step: int = 0,
        constant_lr: bool = False,
        eval_seconds: float = 0.0,
    ):
        """`started` is when the budget began (earlier than now for a run resumed before deciding)."""
        self.seconds, self.started, self.eval_every = seconds, started, eval_every
        # Steps timed before deciding: every step taken by then (indices start_step .. start_step +
        # decide_after) is still in warmup, whose learning rate does not depend on max_steps.
        room = warmup_steps - 1 - start_step
        self.decide_after = 10 if constant_lr else max(1, min(room, 10))
        self.eval_seconds = eval_seconds  # set by each evaluation
        self.first: tuple[int, float] | None = None
        self.facts: dict = {}

    def steps(self, step: int, now: float, cap: int) -> int | None:
        """Called after each step until it returns the run's step count (at most `cap`)."""
        if self.first is None:
            self.first = (step, now)
            return None
        timed = step - self.first[0]
        if timed < self.decide_after:
            return None
        per_step = (now - self.first[1]) / timed
        evals = self.eval_seconds / self.eval_every if self.eval_every else 0.0
        left = self.seconds - (now - self.started) - self.eval_seconds  # the final evaluation included
        total = min(cap, step + max(0, int(left // (per_step + evals))))
        self.facts = {
            "seconds": self.seconds,
            "step_seconds": round(per_step, 4),
            "eval_seconds": round(self.eval_seconds, 2),
            "decided_at_step": step,
            "steps": total,
        }
        return total
