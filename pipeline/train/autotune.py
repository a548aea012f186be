"""Measurements of the machine that start-of-run choices are made from (train/choices.py):
`activation_checkpointing=auto`, `mixed_precision=auto`, `compile=auto`, `micro_batch_size=auto`
and the step count of `train.time_budget`.

Activations: what autograd saves over one row's forward (the loss as training computes it),
counted, times the rows of a micro-batch, against the memory free to this process.

Precision: on a CPU, bf16 autocast is 1.5x faster than fp32 on one x86 CPU, slower on another and
19x slower on an AVX2-only one, so the model's own matmul shapes are screened first (milliseconds),
and only candidates that are not clearly slower get timed forward+backward passes of the real model
on a real batch. A pass much slower than the best ends its candidate's measurement, and the whole
measurement (precision and compile together) stops at MEASURE_SHARE of the run; its real cost is
reported. The weights, gradients and RNG are left as they were: the run trains exactly as with the
explicit choice. A run too short to repay the measurement uses fp32 without measuring.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from contextlib import nullcontext

import psutil
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.device import SCREEN_SLOWER, bf16_speedup, half_precision, model_matmul_shapes
from pipeline.train.loss import auto_chunk_tokens, token_losses
from pipeline.train.preflight import activation_bytes, divisors_desc, find_micro_batch

log = logging.getLogger("pipeline")
MEASURE_SHARE = 0.05  # the measurement may cost at most this share of the run
TIMED_PASSES = 3  # per candidate, after one warm-up pass each
MARGIN = 0.05  # a half precision or compiling must be this much faster to be chosen (near-ties are noise)
ABANDON = 1.5  # a full pass this much slower than the best candidate's ends that candidate's measurement
# What compiling forward+backward may take before it is known, per block of the model: a cold
# compile (empty inductor cache) took 23-28 s for the 4-layer quickstart model and 308 s for the
# 30-layer SmolLM2-135M on 2-core EPYCs. Trying is only worth a run 20x longer.
COMPILE_SECONDS_PER_LAYER = {"cpu": 10.0, "cuda": 5.0}
# Activations may take this share of the memory free at the start, gradients and optimizer states
# aside: past it a micro-batch recomputes them in backward (activation_checkpointing=auto), or a CPU
# micro-batch is smaller (micro_batch_size=auto). A CPU keeps room for the allocator's caching, the
# evaluation and the machine's other work; a GPU's memory is the job's own.
ACTIVATION_SHARE = {"cpu": 0.25, "cuda": 0.75}


def free_memory(device: torch.device) -> int:
    """Bytes free to this process: the GPU's free memory, or the machine's available RAM shared by
    the launch's processes on this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def saved_activation_bytes(model, batch: dict, chunk_tokens, micro_positions: int) -> int:
    """Bytes autograd keeps for backward over one forward of `batch` (each storage once, parameters
    aside), the losses computed as training computes them for a micro-batch of `micro_positions`
    (train.loss_chunk_tokens=auto decides on the micro-batch's logits, not this batch's). The graph
    is dropped unused; dropout draws from a forked RNG, so training's random stream is unchanged."""
    if chunk_tokens == "auto":  # the micro-batch's logits, every position trained, decide on chunking
        chunk_tokens = auto_chunk_tokens(micro_positions, model.config.vocab_size) or "auto"
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t  # kept until the graph is dropped: no address is reused while counting

    was_training = model.training
    model.train()
    cuda = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_losses(model, batch, chunk_tokens)  # the graph, unused, is dropped with the losses
    finally:
        model.train(was_training)
    return sum(saved.values())


def checkpointed_blocks(model) -> list[torch.nn.Module]:
    """The blocks whose activations transformers can recompute in backward, in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def recompute_activations(model, blocks: int | None = None) -> None:
    """Recompute the activations of the first `blocks` blocks in backward (None: of all of them).
    A recomputed block keeps only its input and costs one more forward of itself, so recomputing
    only as many blocks as memory needs keeps the rest of the step's speed."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if blocks is not None:
        for block in checkpointed_blocks(model)[blocks:]:
            block.gradient_checkpointing = False


def autocast_for(device: torch.device, precision: str):
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
        with autocast_for(device, precision):
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
    """{"choice": precision, "seconds": {precision: median seconds per pass}, "cost_seconds", ...}.
    The run's length is given in forward+backward passes or in seconds (a time budget); the passes
    compute the loss as training will (train.loss_chunk_tokens)."""
    options = candidates(device)
    if len(options) == 1:
        return {"choice": options[0], "measured": False}
    started, was_training = time.perf_counter(), model.training
    speedup = {p: round(bf16_speedup(model_matmul_shapes(model.config), device), 3) for p in options if p == "bf16"}
    slow = [p for p, x in speedup.items() if x < 1 / SCREEN_SLOWER]
    kept = [p for p in options if p not in slow]
    times = {}
    if len(kept) > 1:  # else fp32 is the choice, and no full-size pass is needed
        model.train()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _timed_pass(
                model, batch, device, kept[0], loss_chunk_tokens
            )  # warm-up: the first pass pays for allocations
            first = _timed_pass(model, batch, device, kept[0], loss_chunk_tokens)
            total = run_seconds if run_seconds is not None else first * (run_passes or 0)
            cost = first * (len(kept) * (TIMED_PASSES + 1) - 1)  # what measuring the rest at full size would add
            if cost > MEASURE_SHARE * total:
                model.train(was_training)
                reason = f"run too short to measure (~{cost:.1f}s)"
                return {"choice": "no", "measured": False, "reason": reason, "pass_seconds": round(first, 4)}
            times = _timed_rounds(model, batch, device, kept, first, loss_chunk_tokens, started + MEASURE_SHARE * total)
        model.train(was_training)
    seconds = {p: round(statistics.median(t), 4) for p, t in times.items()}
    fastest = min(seconds, key=seconds.get, default="no")
    choice = fastest if seconds.get(fastest, 0) < (1 - MARGIN) * seconds.get("no", 0) else "no"
    result = {
        "choice": choice,
        "measured": True,
        "seconds": seconds,
        "screen_bf16_speedup": speedup,
        "cost_seconds": round(time.perf_counter() - started, 2),
    }
    return dict(result, not_run_at_full_size=slow) if slow else result


def _timed_rounds(model, batch, device, options: list[str], first: float, chunk_tokens, deadline: float) -> dict:
    """{precision: seconds of its timed passes}: a warm-up each, then TIMED_PASSES rounds in turns (so
    drift in machine speed hits all alike). A candidate whose median is ABANDON times the best other
    candidate's is dropped (and logged), and no pass starts after `deadline`. options[0] (fp32) was
    timed once."""
    times = {options[0]: [first]}
    for precision in options[1:]:
        try:
            warm = _timed_pass(model, batch, device, precision, chunk_tokens)
        except RuntimeError as e:  # an op without a kernel for this type here
            log.info("precision: %s does not run here (%s)", precision, str(e).splitlines()[0][:120])
            model.zero_grad(set_to_none=True)
            continue
        if warm < 2 * ABANDON * first:  # a warm-up pays for allocations: judged leniently
            times[precision] = []
        else:
            log.info("precision: %s abandoned after a %.2fs warm-up pass (fp32: %.2fs)", precision, warm, first)
    for round_ in range(TIMED_PASSES):
        for precision in list(times):
            if (round_ == 0 and precision == options[0]) or time.perf_counter() > deadline:
                continue
            times[precision].append(_timed_pass(model, batch, device, precision, chunk_tokens))
            mine = statistics.median(times[precision])
            others = min((statistics.median(t) for p, t in times.items() if t and p != precision), default=mine)
            if precision != options[0] and mine > ABANDON * others:
                log.info("precision: %s abandoned at %.2fs per pass (best other: %.2fs)", precision, mine, others)
                del times[precision]
    return {p: t for p, t in times.items() if t}


def measure_compile(
    eager,
    compiled,
    model,
    device: torch.device,
    run_passes: int,
    run_seconds: float | None,
    agree=lambda decision: decision,
    spent: float = 0.0,
    n_layer: int = 1,
    pass_seconds: float | None = None,
) -> dict:
    """{"choice": compile or not, "seconds": {eager, compiled}, ...}: forward+backward passes of
    `eager()` and `compiled()` (the same losses) timed in turns after compiling. Compiling is only
    tried when its expected cost (COMPILE_SECONDS_PER_LAYER x the model's blocks) fits in what is
    left of MEASURE_SHARE of the run (given in passes or seconds) after `spent` seconds of other
    measurements (`n_layer`: the model's blocks; `pass_seconds`: an eager pass already timed, which
    can rule compiling out without another), and chosen if it is MARGIN faster.
    `agree` makes every process take rank 0's decision (their passes must match)."""
    per_layer = COMPILE_SECONDS_PER_LAYER.get(device.type)
    if per_layer is None:
        return {"choice": False, "measured": False, "reason": f"not tried on {device.type}"}
    prior = per_layer * max(1, n_layer)
    known = run_seconds if run_seconds is not None else pass_seconds and pass_seconds * run_passes
    if known and not agree(prior <= MEASURE_SHARE * known - spent):  # known without a pass
        return {"choice": False, "measured": False, "reason": _too_short(known, prior)}
    times = {"eager": [], "compiled": []}
    was_training = model.training
    model.train()  # as training calls it: dropout on, and the graph compiled is the one training uses
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _timed(eager, device)  # warm-up
        times["eager"].append(_timed(eager, device))
        total = run_seconds if run_seconds is not None else times["eager"][0] * run_passes
        if not agree(prior <= MEASURE_SHARE * total - spent):
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            return {"choice": False, "measured": False, "reason": _too_short(total, prior)}
        compile_seconds = _timed(compiled, device)
        for _ in range(TIMED_PASSES):  # in turns, so drift in machine speed hits both alike
            times["compiled"].append(_timed(compiled, device))
            times["eager"].append(_timed(eager, device))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    seconds = {k: round(statistics.median(t), 4) for k, t in times.items()}
    saved = (seconds["eager"] - seconds["compiled"]) * total / seconds["eager"]  # over the run's passes
    # The cost was judged before compiling (the prior above); once paid, a faster graph is free to use.
    return {
        "choice": seconds["compiled"] < (1 - MARGIN) * seconds["eager"],
        "measured": True,
        "seconds": seconds,
        "compile_seconds": round(compile_seconds, 1),
        "saves_seconds": round(saved, 1),
    }


def _too_short(run_seconds: float, prior: float) -> str:
    return f"a run of ~{run_seconds:.0f}s is too short to repay trying: compiling may take ~{prior:.0f}s"


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
        free = free_memory(device)
        cap = max([d for d in divisors_desc(per_rank) if act(d) <= ACTIVATION_SHARE["cpu"] * free] or [1])
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
    in warmup then, so the decay spans exactly the steps decided; they are stored with checkpoints.
    A checkpoint written before deciding counts as its time every ckpt_every steps. Afterwards
    `repace` re-estimates the count from the pace since deciding (evaluations and checkpoints
    included), for a schedule that can still move its decay (wsd before its cooldown)."""

    REPACE_AFTER = 20  # steps timed since deciding before the pace is trusted
    REPACE_CHANGE = 0.02  # a new count must differ by this share (and 2 steps) to be taken

    def __init__(
        self,
        seconds: float,
        started: float,
        warmup_steps: int,
        eval_every: int,
        start_step: int = 0,
        constant_lr: bool = False,
        eval_seconds: float = 0.0,
        ckpt_every: int = 0,
    ):
        """`started` is when the budget began (earlier than now for a run resumed before deciding)."""
        self.seconds, self.started, self.eval_every, self.ckpt_every = seconds, started, eval_every, ckpt_every
        # Steps timed before deciding: every step taken by then (indices start_step .. start_step +
        # decide_after) is still in warmup, whose learning rate does not depend on max_steps.
        room = warmup_steps - 1 - start_step
        self.decide_after = 10 if constant_lr else max(1, min(room, 10))
        self.eval_seconds = eval_seconds  # set by each evaluation
        self.save_seconds = 0.0  # of the last checkpoint (saved())
        self.saves_timed = 0.0  # seconds of checkpoints inside the steps timed so far
        self.first: tuple[int, float] | None = None
        self.decided: tuple[int, float] | None = None  # (step, time) when the count was fixed
        self.facts: dict = {}

    def steps(self, step: int, now: float, cap: int) -> int | None:
        """Called after each step until it returns the run's step count (at most `cap`)."""
        if self.first is None:
            self.first = (step, now)
            return None
        timed = step - self.first[0]
        if timed < self.decide_after:
            return None
        per_step = (now - self.first[1] - self.saves_timed) / timed
        evals = self.eval_seconds / self.eval_every if self.eval_every else 0.0
        saves = self.save_seconds / self.ckpt_every if self.ckpt_every else 0.0  # once one was timed
        left = self.seconds - (now - self.started) - self.eval_seconds  # the final evaluation included
        total = min(cap, step + max(0, int(left // (per_step + evals + saves))))
        self.facts = {
            "seconds": self.seconds,
            "step_seconds": round(per_step, 4),
            "eval_seconds": round(self.eval_seconds, 2),
            "save_seconds": round(self.save_seconds, 2),
            "decided_at_step": step,
            "steps": total,
        }
        self.decided = (step, now)
        return total

    def saved(self, seconds: float) -> None:
        """A checkpoint took `seconds`: the ones to come are counted, and the steps timed exclude it."""
        self.save_seconds = seconds
        if self.first is not None and self.decided is None:
            self.saves_timed += seconds

    def repace(self, step: int, now: float, cap: int, floor: int) -> int | None:
        """A new step count (between `floor` and `cap`) when the pace since deciding says the run
        would end more than REPACE_CHANGE off its budget, else None."""
        timed = step - self.decided[0]
        if timed < self.REPACE_AFTER:
            return None
        per_step = (now - self.decided[1]) / timed  # evaluations and checkpoints included
        left = self.seconds - (now - self.started) - self.eval_seconds
        total = min(cap, max(floor, step + max(0, int(left // per_step))))
        if abs(total - self.facts["steps"]) < max(2, self.REPACE_CHANGE * self.facts["steps"]):
            return None
        self.facts.update(steps=total, repaced_at_step=step, pace_seconds=round(per_step, 4))
        return total
