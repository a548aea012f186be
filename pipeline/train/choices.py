"""Every start-of-run decision, made before the Trainer is built and handed to it as values.

`prepare_launch(job)` decides, in this order: what this run's checkpoints already fixed (a resume
keeps it), the mixed precision (measured on a CPU), the Strategy of the launch, the time budget's
step count (or the TimeBudget that fixes it from the first steps' timing), the micro-batch
(micro_batch_size=auto), and whether training's loss runs compiled (compile=auto, measured where
the run is long enough to repay trying). Each is a function that returns a value; the choices
are logged, written to the manifest (`launch`) and stored with every checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from pipeline.config.train import TrainSpec
from pipeline.train import checkpoints
from pipeline.train.autotune import TimeBudget, candidates, measure_compile, measure_micro_batch, measure_precision
from pipeline.train.layout import batch_layout
from pipeline.train.loss import CompiledOrEager, is_compiled, token_losses
from pipeline.train.optim import decay_start
from pipeline.train.strategy import Strategy, broadcast_from_main, process_info, to_device

log = logging.getLogger("pipeline")
PRECISION_LABEL = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


@dataclass
class LaunchChoices:
    """What the run decided at its start. `budget` is the one decision still open: a TimeBudget
    fixes the step count from the first steps' timing, then the Trainer sets it to None and
    `budget_facts` says how the count was decided."""

    precision: dict  # {"choice": "no" | "bf16" | "fp16", "measured": bool, "seconds"/"reason": ...}
    compile: dict  # {"choice": bool, "measured": bool, ...}
    budget: TimeBudget | None = None
    budget_facts: dict | None = None

    def for_checkpoint(self, spec: TrainSpec, strategy: Strategy, compiled: bool) -> dict:
        """What a checkpoint stores so that a resume keeps these choices."""
        choices = {
            "precision": strategy.precision,
            "precision_device": strategy.device.type,
            "compile": compiled,
            "schedule_steps": spec.max_steps,
        }
        if spec.time_budget and self.budget is None:
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
            time_budget=self.budget_facts,
        )

    def budget_steps(self, spec: TrainSpec, step: int, cap: int, broadcast) -> int | None:
        """Called after each step while the time budget is open: the run's step count once enough
        steps are timed (the main process's, through `broadcast`), else None."""
        steps = self.budget.steps(step, time.time(), cap)
        if steps is None:
            return None
        steps = broadcast(steps)
        self.budget_facts = facts = dict(self.budget.facts, steps=steps)
        capped = " (train.max_steps caps it)" if steps == cap else ""
        log.info(
            "time budget %s: %.3fs per step, %.1fs per evaluation -> %d steps%s",
            spec.time_budget,
            facts["step_seconds"],
            facts["eval_seconds"],
            steps,
            capped,
        )
        self.budget = None
        return steps


class Launch(NamedTuple):
    """Everything the Trainer is built from."""

    spec: TrainSpec  # the job's, with max_steps as a checkpoint's time budget fixed it
    strategy: Strategy
    model: torch.nn.Module  # prepared for the launch
    optimizer: torch.optim.Optimizer
    loss: Callable  # training's per-token losses: token_losses, or it compiled with the model
    choices: LaunchChoices


def prepare_launch(job) -> Launch:
    """Make every start-of-run choice for `job` (a TrainingJob) and prepare model and optimizer."""
    started = time.time()  # a time budget counts the measurements too
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
    same_device = stored.get("precision_device") == process_info().device.type
    precision = choose_precision(job, stored.get("precision") if same_device else None)
    strategy = Strategy(spec, job.out_dir, job.tracking.trackers, precision["choice"])
    spec, budget, budget_facts = choose_step_count(spec, stored, started)
    model = job.model
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    micro = choose_micro_batch(model, spec, strategy) if spec.micro_batch_size == "auto" else None
    model, optimizer = strategy.setup(model, micro)
    compile_choice, loss = choose_compile(job, spec, strategy, model, stored.get("compile") if same_device else None)
    return Launch(
        spec, strategy, model, optimizer, loss, LaunchChoices(precision, compile_choice, budget, budget_facts)
    )


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
        timings = ", ".join(f"{PRECISION_LABEL[p]} {t:.3f}s" for p, t in result["seconds"].items())
        log.info(
            "precision: %s, measured on this machine (%s per forward+backward of %d x %d tokens; a half "
            "precision must be 5%% faster); set train.mixed_precision to choose",
            PRECISION_LABEL[result["choice"]],
            timings,
            micro,
            spec.seq_len,
        )
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
        )
        return spec, budget, None
    return spec, None, None


def with_max_steps(spec: TrainSpec, steps: int) -> TrainSpec:
    return replace(spec, max_steps=steps, key=spec._key)


def choose_micro_batch(model, spec: TrainSpec, strategy: Strategy) -> int:
    """micro_batch_size=auto: the largest micro-batch that fits, agreed by all ranks (the minimum)."""
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
    size = strategy.min_over_ranks(size)
    log.info("micro_batch_size=auto: %d sequences per device fit", size)
    return size


def choose_compile(job, spec: TrainSpec, strategy: Strategy, model, stored: bool | None) -> tuple[dict, Callable]:
    """(choice, training's loss function): train.compile, or for auto: as stored with this run's
    checkpoints, else measured on this machine: the loss eager against compiled with the model, on
    a real micro-batch, where the run is long enough to repay trying (rank 0 decides for all)."""
    if spec.compile != "auto":
        return {"choice": bool(spec.compile), "measured": False}, CompiledOrEager(
            token_losses
        ) if spec.compile else token_losses
    compiled = None
    if stored is not None:
        result = {"choice": stored, "measured": False, "reason": "as chosen at the start of this run"}
    elif not job.fixed_shapes:
        result = {
            "choice": False,
            "measured": False,
            "reason": "batches vary in width (unpacked chat rows), and "
            "each new width would compile again; finetune.packing=true gives fixed rows",
        }
    elif strategy.sharded:  # DeepSpeed's backward is the engine's, not the loss's: no timed passes
        on = strategy.device.type == "cuda"
        result = {
            "choice": on,
            "measured": False,
            "reason": f"not measured under {strategy.name}" + ("; on, as it wins on GPUs" if on else ""),
        }
    else:
        compiled, result = _measure_compile(job, spec, strategy, model)
    loss = (compiled or CompiledOrEager(token_losses)) if result["choice"] else token_losses
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


def _measure_compile(job, spec: TrainSpec, strategy: Strategy, model) -> tuple[CompiledOrEager, dict]:
    micro = strategy.layout.micro
    batch = to_device(job.train_batch(strategy.rank * micro, micro), strategy.device)
    compiled = CompiledOrEager(token_losses)
    chunk = strategy.loss_chunk_tokens
    with strategy.autocast():
        result = measure_compile(
            lambda: token_losses(model, batch, chunk),
            lambda: compiled(model, batch, chunk),
            model,
            strategy.device,
            spec.max_steps * strategy.layout.accum,
            spec.budget_seconds,
            strategy.broadcast,
        )
    if not is_compiled(compiled):  # it failed, and said so
        result = {"choice": False, "measured": True, "reason": "compiling failed"}
    return compiled, strategy.broadcast(result)


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
