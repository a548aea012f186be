"""Every start-of-run decision, made before the Trainer is built and handed to it as values.

`prepare_launch(job)` decides, in this order: what this run's checkpoints already fixed (a resume
keeps it), activation checkpointing (by the activations' measured size against the memory free),
the mixed precision (measured on a CPU), the Strategy of the launch, the time budget's
step count (or the TimeBudget that fixes it from the first steps' timing), the micro-batch
(micro_batch_size=auto), and whether training's loss runs compiled (compile=auto, measured where
the run is long enough to repay trying). Each is a function that returns a value; the choices
are logged, written to the manifest (`launch`) and stored with every checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from pipeline.config.train import TrainSpec
from pipeline.device import bf16_speedup
from pipeline.model.hf_dir import sharded_launch
from pipeline.train import checkpoints
from pipeline.train.autotune import (
    ACTIVATION_SHARE,
    MARGIN,
    TimeBudget,
    autocast_for,
    candidates,
    checkpointed_blocks,
    free_memory,
    measure_compile,
    measure_micro_batch,
    measure_precision,
    recompute_activations,
    saved_activation_bytes,
)
from pipeline.train.layout import batch_layout
from pipeline.train.loss import CompiledOrEager, is_compiled, token_losses
from pipeline.train.memory import freed_memory_kept
from pipeline.train.muon import iteration_shapes
from pipeline.train.optim import decay_start, hidden_matrices
from pipeline.train.preflight import log_preflight
from pipeline.train.strategy import Strategy, broadcast_from_main, process_info, to_device
from pipeline.train.throughput import peak_flops

log = logging.getLogger("pipeline")
MUON_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISION_LABEL = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


@dataclass
class LaunchChoices:
    """What the run decided at its start. `budget` is the one decision still open: a TimeBudget
    fixes the step count from the first steps' timing (`budget_facts` says how; budget_steps
    applies it), and with decay=wsd keeps the pace while the rate is constant."""

    precision: dict  # {"choice": "no" | "bf16" | "fp16", "measured": bool, "seconds"/"reason": ...}
    compile: dict  # {"choice": bool, "measured": bool, ...}
    checkpointing: dict  # {"choice": bool, "measured": bool, "activations_gb"/"reason": ...}
    budget: TimeBudget | None = None
    budget_facts: dict | None = None
    muon_dtype: str | None = None  # "fp32" | "bf16": of Muon's Newton-Schulz iterations (train.optimizer=muon)
    measure_seconds: float = 0.0  # what the start-of-run measurements cost, all of them

    def for_checkpoint(self, spec: TrainSpec, strategy: Strategy, compiled: bool) -> dict:
        """What a checkpoint stores so that a resume keeps these choices."""
        choices = {
            "muon_dtype": self.muon_dtype,
            "precision": strategy.precision,
            "precision_device": strategy.device.type,
            "compile": compiled,
            "schedule_steps": spec.max_steps,
        }
        if spec.time_budget and (self.budget is None or self.budget.decided):
            choices.update(max_steps=spec.max_steps, budget_seconds=spec.budget_seconds)
        elif self.budget is not None:
            choices.update(budget_spent=time.time() - self.budget.started, eval_seconds=self.budget.eval_seconds)
        return choices

    def manifest(self, strategy: Strategy, compiled: bool) -> dict:
        """The launch's facts and these choices, for the manifest's `launch`."""
        return dict(
            strategy.describe(compiled),
            precision_choice=self.precision,
            compile_choice=self.compile,
            activation_checkpointing=self.checkpointing,
            time_budget=self.budget_facts,
            muon_dtype=self.muon_dtype,
            measure_seconds=self.measure_seconds,
        )

    def budget_open(self, spec: TrainSpec, step: int, read_step: bool) -> bool:
        """Whether the time budget may change the step count after `step`: until it is decided,
        and at read steps of a wsd run whose cooldown has not begun (moving it keeps the pace)."""
        if self.budget is None or not self.budget.decided:
            return self.budget is not None
        at_log_step = read_step and step % spec.log_every == 0  # not every step under skip_nonfinite
        return at_log_step and spec.decay == "wsd" and spec.cooldown < 1 and step + 1 < decay_start(spec)

    def budget_steps(self, spec: TrainSpec, step: int, cap: int, broadcast) -> int | None:
        """The run's step count once enough steps are timed, or a new one when a wsd run's pace
        changed (the main process's, through `broadcast`, which every rank calls alike), else None."""
        budget = self.budget
        if budget.decided:  # wsd, still at a constant rate: the cooldown must start after this step
            floor = math.ceil((step + 2) / (1 - spec.cooldown)) + 1
            steps = budget.repace(step, time.time(), cap, floor)
            steps, budget.facts = broadcast((steps, budget.facts))  # the main process's, facts included
            if steps is not None:
                self.budget_facts = dict(budget.facts, steps=steps)
                log.info(
                    "time budget %s: the pace is now %.3fs per step -> %d steps, the cooldown from step %d",
                    spec.time_budget,
                    budget.facts["pace_seconds"],
                    steps,
                    decay_start(spec, steps),
                )
            return steps
        steps = budget.steps(step, time.time(), cap)
        if steps is None:
            return None
        steps = broadcast(steps)
        self.budget_facts = facts = dict(budget.facts, steps=steps)
        capped = " (train.max_steps caps it)" if steps == cap else ""
        log.info(
            "time budget %s: %.3fs per step, %.1fs per evaluation -> %d steps%s",
            spec.time_budget,
            facts["step_seconds"],
            facts["eval_seconds"],
            steps,
            capped,
        )
        return steps

    def budget_report(self, spec: TrainSpec, started: float, resumed: bool) -> None:
        """At the end of a budgeted run: how long the stage has taken against its budget (not for a
        resumed run: its earlier sessions' time is not known)."""
        if not spec.time_budget or resumed:
            return
        elapsed = time.time() - started
        over = elapsed / spec.budget_seconds - 1
        self.budget_facts = dict(self.budget_facts or {}, elapsed_seconds=round(elapsed, 1), overrun=round(over, 3))
        log.info("time budget %s: training ended %.0fs into the stage (%+.0f%%)", spec.time_budget, elapsed, 100 * over)


class Launch(NamedTuple):
    """Everything the Trainer is built from."""

    spec: TrainSpec  # the job's, with max_steps as a checkpoint's time budget fixed it
    strategy: Strategy
    model: torch.nn.Module  # prepared for the launch
    optimizer: torch.optim.Optimizer
    loss: Callable  # training's per-token losses (token_losses) or the job's objective, maybe compiled with the model
    choices: LaunchChoices


def prepare_launch(job, allocator: ExitStack | None = None) -> Launch:
    """Make every start-of-run choice for `job` (a TrainingJob) and prepare model and optimizer.
    `allocator`: where a CPU run enters glibc's keep-freed-buffers mode, unless activations are
    recomputed to save memory (there the freed buffers go back to the system as well: kept, they
    held 8.1 GB against 6.9 GB at the same speed, LoRA on SmolLM2-135M at 8 x 512 tokens)."""
    spec = job.spec
    stored = (
        checkpoints.peek(
            job.out_dir / "checkpoints",
            job.fingerprint,
            (lambda state: same_budget(spec, state)) if spec.time_budget else None,
        )
        if job.resume != "never"
        else {}
    )
    kept = stored if stored.get("precision_device") == process_info().device.type else {}  # same kind of device
    spent = [0.0]  # seconds of measuring: the budget of MEASURE_SHARE is shared by all of them

    def measured(choose, *args):
        t0 = time.perf_counter()
        result = choose(*args)
        spent[0] += time.perf_counter() - t0
        return result

    checkpointing = measured(choose_checkpointing, job)
    spec = replace(spec, activation_checkpointing=checkpointing["choice"], key=spec._key)
    if spec.activation_checkpointing:  # first: the measurements below then run as training will
        recompute_activations(job.model, checkpointing.get("recomputed_blocks"))
    elif allocator is not None and process_info().device.type == "cpu":
        allocator.enter_context(freed_memory_kept())  # before measuring: it changes timings
    precision = measured(choose_precision, job, kept.get("precision"))
    strategy = Strategy(spec, job.out_dir, job.tracking.trackers, precision["choice"])
    spec, budget, budget_facts = choose_step_count(spec, stored, job.started)
    model = job.model
    auto_micro = spec.micro_batch_size == "auto"
    micro = measured(choose_micro_batch, model, spec, strategy, job.objective) if auto_micro else None
    muon_dtype = measured(choose_muon_dtype, spec, model, strategy, kept.get("muon_dtype"))
    model, optimizer = strategy.setup(model, micro, MUON_DTYPES.get(muon_dtype, torch.bfloat16))
    timed = precision.get("seconds", {}).get(precision["choice"], precision.get("pass_seconds"))
    timed = timed if spec.micro_batch_size != "auto" else None  # precision timed another micro-batch then
    compile_choice, loss = measured(choose_compile, job, spec, strategy, model, kept.get("compile"), spent[0], timed)
    choices = LaunchChoices(
        precision, compile_choice, checkpointing, budget, budget_facts, muon_dtype, round(spent[0], 2)
    )
    if spent[0] >= 0.1:
        log.info("start-of-run measurements took %.1fs", spent[0])
    _log_launch(job, spec, strategy, model, is_compiled(loss), recomputed_share(checkpointing))
    return Launch(spec, strategy, model, optimizer, loss, choices)


def _log_launch(job, spec: TrainSpec, strategy: Strategy, model, compiled: bool, recomputed: float) -> None:
    """The batch layout and the pre-flight estimates of the prepared launch."""
    layout = strategy.layout
    unit = getattr(job.objective, "unit", None)  # an objective's unit (pairs), else sequences of seq_len tokens
    what = f"{unit} of sequences up to {spec.seq_len} tokens" if unit else f"sequences x {spec.seq_len} tokens = "
    log.info(
        "batch: %d %s%s = %d processes x %d micro-batch x %d accumulation; precision %s%s on %s, strategy %s",
        layout.global_seqs, what, "" if unit else f"{spec.batch_tokens} tokens/step", strategy.world, layout.micro,
        layout.accum,
        strategy.precision, ", compiled" if compiled else "", strategy.device, strategy.name,
    )  # fmt: skip
    peak = peak_flops(strategy.device, strategy.precision)
    config = strategy.unwrap(model).config
    log_preflight(
        model, config, job.flops_per_token, spec, layout.micro, strategy.world, strategy.precision, peak, recomputed
    )


def choose_muon_dtype(spec: TrainSpec, model, strategy: Strategy, stored: str | None) -> str | None:
    """The dtype of Muon's Newton-Schulz iterations: bf16 on GPUs; on a CPU bf16 only where its
    matmuls of the hidden matrices' shapes measure MARGIN faster than fp32 (native bf16), else fp32
    (an AVX2-only CPU emulates bf16 ~20x slower); as stored with this run's checkpoints on resume."""
    if spec.optimizer != "muon" or strategy.sharded:
        return None
    if stored or strategy.device.type != "cpu":
        return stored or "bf16"
    speedup = strategy.broadcast(bf16_speedup(iteration_shapes(hidden_matrices(model)), strategy.device))
    dtype = "bf16" if speedup > 1 / (1 - MARGIN) else "fp32"
    log.info(
        "muon: Newton-Schulz iterations in %s (bf16 matmuls of its shapes run %.2fx fp32's speed here)", dtype, speedup
    )
    return dtype


def choose_checkpointing(job) -> dict:
    """train.activation_checkpointing, or for auto: on where the activations of one micro-batch,
    measured on one of its rows, would pass ACTIVATION_SHARE of the memory free to this process
    besides gradients and optimizer states (the main process decides for all)."""
    spec, model = job.spec, job.model
    if spec.activation_checkpointing != "auto":
        return {"choice": bool(spec.activation_checkpointing), "measured": False}
    device, world, rank = process_info()
    if not getattr(model, "supports_gradient_checkpointing", False):
        result = {"choice": False, "measured": False, "reason": f"{type(model).__name__} cannot recompute them"}
    elif spec.micro_batch_size == "auto":
        result = {"choice": False, "measured": False, "reason": "micro_batch_size=auto sizes the batch to memory"}
    elif sharded_launch():  # the model is not sharded yet: a whole copy per device would be measured
        result = {"choice": False, "measured": False, "reason": "not measured in a sharded launch"}
    else:
        result = _measure_checkpointing(job, device, world, rank)
    result = broadcast_from_main(result)
    if "reason" in result:
        log.info("activation checkpointing: %s (%s)", "on" if result["choice"] else "off", result["reason"])
    else:
        share = recomputed_share(result)
        log.info(
            "activation checkpointing: %s (a micro-batch's activations measure %.2f GB, %s the %.2f GB they may "
            "take here); set train.activation_checkpointing to choose",
            "off"
            if not share
            else "on"
            if share == 1
            else f"on for {result['recomputed_blocks']} of {result['blocks']} blocks",
            result["activations_gb"],
            "over" if result["choice"] else "within",
            result["room_gb"],
        )
    return result


def recomputed_share(checkpointing: dict) -> float:
    """The share of the model's blocks whose activations a checkpointing choice recomputes."""
    if not checkpointing["choice"]:
        return 0.0
    return checkpointing.get("recomputed_blocks", 1) / checkpointing.get("blocks", 1)


def _measure_checkpointing(job, device: torch.device, world: int, rank: int) -> dict:
    """The decision of activation_checkpointing=auto from one row's saved activations (in the GPU's
    half precision where it has one; a CPU's is chosen later, so fp32 there, the larger)."""
    spec, model = job.spec, job.model
    micro = min(spec.micro_batch_size, batch_layout(spec, world, 1).global_seqs // world)
    row = to_device(job.train_batch(rank * micro, 1), device)
    positions = micro * spec.seq_len * getattr(job.objective, "sequences_per_unit", 1)  # at most, in a micro-batch
    if not getattr(model, "hf_device_map", None):  # a quantized base is placed when loaded
        model.to(device)
    precision = spec.mixed_precision if spec.mixed_precision != "auto" else candidates(device)[0]
    try:
        with autocast_for(device, precision):
            per_row = saved_activation_bytes(model, row, spec.loss_chunk_tokens, positions)
    except torch.cuda.OutOfMemoryError:  # one row without recomputation does not fit: the answer is known
        return {"choice": True, "measured": True, "reason": "one row's activations did not fit"}
    activations = per_row * positions / row["input_ids"].numel()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the measurement's cached blocks are free for training
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    room = max(0.0, ACTIVATION_SHARE.get(device.type, 0.75) * (free_memory(device) - 12 * trainable))  # grads, AdamW
    result = {"choice": activations > room, "measured": True}
    result.update(activations_gb=round(activations / 1e9, 3), room_gb=round(room / 1e9, 3))
    blocks = len(checkpointed_blocks(model))
    if result["choice"] and blocks > 1:  # how many blocks must recompute: each one recomputed frees its share
        recompute_activations(model)
        try:
            with autocast_for(device, precision):
                recomputed = saved_activation_bytes(model, row, spec.loss_chunk_tokens, positions)
        finally:
            model.gradient_checkpointing_disable()
        per_block = (per_row - recomputed) * positions / row["input_ids"].numel() / blocks
        needed = math.ceil((activations - room) / per_block) if per_block > 0 else blocks
        result.update(recomputed_blocks=min(needed, blocks), blocks=blocks)
    return result


def choose_precision(job, stored: str | None) -> dict:
    """train.mixed_precision, or for auto: as stored with this run's checkpoints, else measured
    on this machine (the main process's measurement, for every rank)."""
    spec = job.spec
    if spec.mixed_precision != "auto":
        return {"choice": spec.mixed_precision, "measured": False}
    if stored:
        return {"choice": stored, "measured": False, "reason": "as chosen at the start of this run"}
    device, world, rank = process_info()
    if len(candidates(device)) == 1:
        return {"choice": candidates(device)[0], "measured": False}
    per_rank = batch_layout(spec, world, 1).global_seqs // world
    micro = min(spec.micro_batch_size if isinstance(spec.micro_batch_size, int) else 4, per_rank)
    batch = to_device(job.train_batch(rank * micro, micro), device)
    result = measure_precision(
        job.model.to(device),
        batch,
        device,
        spec.max_steps * per_rank // micro,
        spec.budget_seconds,
        spec.loss_chunk_tokens,
    )
    result = broadcast_from_main(result)
    if result["measured"]:
        parts = [f"{PRECISION_LABEL[p]} {t:.3f}s" for p, t in result["seconds"].items()]
        timings = f"{', '.join(parts)} per forward+backward of {micro} x {spec.seq_len} tokens; " if parts else ""
        screen = ", ".join(f"{p} matmuls of its shapes at {x:.2f}x fp32's speed" + (" (not run at full size)"
                           if p in result.get("not_run_at_full_size", ()) else "")
                           for p, x in result["screen_bf16_speedup"].items())  # fmt: skip
        log.info(
            "precision: %s, measured on this machine in %.1fs (%s; %sa half precision must be 5%% faster); set "
            "train.mixed_precision to choose",
            PRECISION_LABEL[result["choice"]], result["cost_seconds"], screen, timings,
        )  # fmt: skip
    else:
        log.info("precision: %s (%s)", PRECISION_LABEL[result["choice"]], result.get("reason", ""))
    return result


def choose_step_count(
    spec: TrainSpec, stored: dict, started: float
) -> tuple[TrainSpec, TimeBudget | None, dict | None]:
    """(spec, budget, facts) for train.time_budget: the step count a checkpoint of this run kept,
    or a TimeBudget that fixes it from the first steps (a run resumed before deciding goes on with
    the time it had spent). Without a budget: spec unchanged, no budget."""
    if spec.time_budget and stored.get("max_steps"):  # decided before the checkpoint: keep it
        facts = {"seconds": spec.budget_seconds, "steps": stored["max_steps"], "kept_from_checkpoint": True}
        return with_max_steps(spec, stored["max_steps"]), None, facts
    if spec.time_budget:
        budget = TimeBudget(
            spec.budget_seconds,
            started - stored.get("budget_spent", 0.0),
            spec.warmup_steps,
            spec.eval_every,
            stored.get("step", 0),
            spec.decay == "constant",
            stored.get("eval_seconds", 0.0),
            spec.ckpt_every,
        )
        return spec, budget, None
    return spec, None, None


def with_max_steps(spec: TrainSpec, steps: int) -> TrainSpec:
    return replace(spec, max_steps=steps, key=spec._key)


def choose_micro_batch(model, spec: TrainSpec, strategy: Strategy, objective=None) -> int:
    """micro_batch_size=auto: the largest micro-batch that fits, agreed by all ranks (the minimum);
    for an objective, in its units (pairs: two sequences each)."""
    per_rank = batch_layout(spec, strategy.world, micro_batch=1).global_seqs // strategy.world  # validates first
    size = measure_micro_batch(
        model,
        seq_len=spec.seq_len,
        per_rank=per_rank,
        device=strategy.device,
        autocast=strategy.autocast,
        half=strategy.precision in ("bf16", "fp16"),
        chunk_tokens=strategy.loss_chunk_tokens,
        checkpointing=spec.activation_checkpointing,
    )
    fit = max(1, strategy.min_over_ranks(size) // getattr(objective, "sequences_per_unit", 1))
    size = max(k for k in range(1, fit + 1) if per_rank % k == 0)  # the layout needs a divisor
    log.info("micro_batch_size=auto: %d %s per device fit", size, getattr(objective, "unit", "sequences"))
    return size


def choose_compile(
    job, spec: TrainSpec, strategy: Strategy, model, stored: bool | None, spent: float = 0.0, timed: float | None = None
) -> tuple[dict, Callable]:
    """(choice, training's loss function): train.compile, or for auto: as stored with this run's
    checkpoints, else measured on this machine: the loss eager against compiled with the model, on
    a real micro-batch, where the run is long enough to repay trying (rank 0 decides for all;
    `timed`: seconds of an eager pass of this micro-batch that the precision's choice measured)."""
    target = job.objective or token_losses  # what a step calls: compiled with the model, or eager
    if spec.compile != "auto":
        loss = CompiledOrEager(target) if spec.compile else target
        return {"choice": bool(spec.compile), "measured": False}, loss
    compiled = None
    if stored is not None:
        result = {"choice": stored, "measured": False, "reason": "as chosen at the start of this run"}
    elif not job.fixed_shapes:
        result = {
            "choice": False,
            "measured": False,
            "reason": "batches vary in shape (unpacked chat rows, preference pairs), and each new "
            "shape would compile again; finetune.packing=true gives fixed rows",
        }
    elif strategy.sharded:  # DeepSpeed's backward is the engine's, not the loss's: no timed passes
        on = strategy.device.type == "cuda"
        result = {
            "choice": on,
            "measured": False,
            "reason": f"not measured under {strategy.name}" + ("; on, as it wins on GPUs" if on else ""),
        }
    else:
        compiled, result = _measure_compile(job, spec, strategy, model, spent, timed)
    compiled = compiled if job.objective is None else None  # the timed passes compiled token_losses
    loss = (compiled or CompiledOrEager(target)) if result["choice"] else target
    if result["measured"] and "seconds" in result:
        t = result["seconds"]
        log.info(
            "compile: %s, measured on this machine (eager %.3fs, compiled %.3fs per forward+backward after "
            "%.0fs compiling; compiling must be 5%% faster); set train.compile to choose",
            "on" if result["choice"] else "off",
            t["eager"],
            t["compiled"],
            result["compile_seconds"],
        )
    else:
        log.info("compile: %s (%s)", "on" if result["choice"] else "off", result.get("reason", "train.compile"))
    return result, loss


def _measure_compile(
    job, spec: TrainSpec, strategy: Strategy, model, spent: float, timed: float | None
) -> tuple[CompiledOrEager | None, dict]:
    """(the compiled loss if compiling was tried, the decision). torch.compile is only set up when
    the measurement gets that far: importing dynamo alone takes seconds."""
    micro = strategy.layout.micro
    batch = to_device(job.train_batch(strategy.rank * micro, micro), strategy.device)
    chunk = strategy.loss_chunk_tokens
    tried: list[CompiledOrEager] = []

    def compiled_losses():
        if not tried:
            tried.append(CompiledOrEager(token_losses))
        return tried[0](model, batch, chunk)

    with strategy.autocast():
        result = measure_compile(
            lambda: token_losses(model, batch, chunk),
            compiled_losses,
            model,
            strategy.device,
            spec.max_steps * strategy.layout.accum,
            spec.budget_seconds,
            strategy.broadcast,
            spent,
            getattr(strategy.unwrap(model).config, "num_hidden_layers", 1),
            timed,
        )
    if tried and not is_compiled(tried[0]):  # it failed, and said so
        result = {"choice": False, "measured": True, "reason": "compiling failed"}
    return (tried[0] if tried else None), strategy.broadcast(result)


def same_budget(spec: TrainSpec, state: dict) -> bool:
    """A budgeted run resumes only checkpoints of its own budget: its step count decided with
    the same budget, or written before deciding."""
    if "budget_seconds" in state:
        return state["budget_seconds"] == spec.budget_seconds
    return "budget_spent" in state


def on_schedule(spec: TrainSpec, state: dict) -> bool:
    """Whether a checkpoint of this config lies on this run's learning-rate schedule: trained
    for the same step count, or stopped before a different one changes the rate. An extended
    wsd run so resumes before its old cooldown and redoes it (exactly a longer run); a cosine
    or linear run resumes from its newest checkpoint with the rate of the new schedule."""
    step, trained_for = state["step"], state.get("schedule_steps", spec.max_steps)
    if step > spec.max_steps or (spec.time_budget and not same_budget(spec, state)):
        return False
    if trained_for == spec.max_steps or spec.decay == "constant":
        return True
    if spec.decay == "wsd":
        return step <= min(decay_start(spec, trained_for), decay_start(spec))
    if trained_for > spec.max_steps:  # a shorter cosine run never reuses a longer one's undecayed steps
        return False
    log.warning(
        "resuming step %d of a %d-step %s schedule for %d steps: the learning rate follows the new "
        "schedule from here, so this is not the run a straight %d steps would be (train.decay=wsd "
        "makes runs extendable exactly)",
        step,
        trained_for,
        spec.decay,
        spec.max_steps,
        spec.max_steps,
    )
    return True
