"""The one training loop, shared by pretrain and finetune: `run_training(job, publish)`.

A step: this rank's micro-batches, forward + backward each (gradients synced on the last),
clip, AdamW. Every start-of-run choice is made before the Trainer is built (choices.py) and the
loop asks the Strategy everything that depends on the launch. A step leaves its
loss, grad norm and token counts on the device; they are read back (one host sync) every
log_every steps and before any evaluation or checkpoint, and every step is checked then.

Loss normalisation: every micro-batch adds sum(token losses) * world / (trained tokens in the
whole global step). Gradient averaging across ranks then gives the mean over all trained tokens
of the step, so 1 process, N processes and any accumulation split give the same update.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from pipeline.config.train import TrainSpec
from pipeline.errors import PipelineError, TrainingStopped
from pipeline.train import checkpoints
from pipeline.train.bpb import bits_per_byte
from pipeline.train.choices import Launch, on_schedule, prepare_launch, with_max_steps
from pipeline.train.loss import IGNORE, is_compiled, token_losses
from pipeline.train.memory import peak_memory_gb
from pipeline.train.metrics_file import MetricsFile
from pipeline.train.optim import decay_start, lr_at
from pipeline.train.signals import StopSignal
from pipeline.train.strategy import to_device
from pipeline.train.throughput import mfu, peak_flops

log = logging.getLogger("pipeline")
MAX_OVERFLOWS_IN_A_ROW = 30  # halving the fp16 loss scale 30 times (2**16 -> 2**-14) and still inf: a real NaN


@dataclass
class Tracking:
    """Experiment trackers besides metrics.jsonl (accelerate's: wandb, tensorboard)."""

    trackers: tuple[str, ...] = ()
    project: str = "pipeline"
    config: dict = field(default_factory=dict)


@dataclass
class TrainingJob:
    """What a training stage hands to run_training."""

    model: torch.nn.Module
    spec: TrainSpec
    out_dir: Path
    fingerprint: str  # the runner's hash of config + inputs: checkpoints of another run are never resumed
    train_batch: Callable[[int, int], dict]  # (first global sample, count) -> {"input_ids", "labels", ...}
    eval_batches: Callable[[int], list[dict]]  # micro-batch size -> the fixed validation batches
    token_bytes: torch.Tensor | None = None  # (vocab,) bytes per token: enables bits per byte
    flops_per_token: float | None = None  # enables MFU on GPUs with a known peak
    resume: str = "auto"  # auto | never
    tracking: Tracking = field(default_factory=Tracking)
    fixed_shapes: bool = True  # every training batch has the same shape (not so for unpacked chat rows)
    started: float = field(default_factory=time.time)  # when the stage began: a time budget counts from here
    # None: next-token prediction, the loss a mean over trained tokens. Else what a step minimises
    # instead (preference.PreferenceObjective): objective(model, batch, chunk) -> (unit losses, unit
    # metrics), the loss a mean over objective.units(batch), and objective.metrics logged beside it.
    objective: Callable | None = None


def run_training(job: TrainingJob, publish: Callable[[torch.nn.Module, dict], None]) -> dict:
    """Train, then call publish(model, consolidated state dict) on the main process; returns the
    summary (initial/final evaluation, steps, tokens, speed, and the launch's facts)."""
    with ExitStack() as allocator:  # glibc's settings for the run (prepare_launch decides), undone after it
        trainer = Trainer(job, prepare_launch(job, allocator))
        summary = trainer.fit()
    state_dict = trainer.strategy.consolidated_state_dict(trainer.model)
    if trainer.strategy.is_main:
        publish(trainer.unwrapped_model, state_dict)
    trainer.strategy.wait()
    return summary


class StepStats(NamedTuple):
    """One optimizer step's results, as device tensors until read back (then floats)."""

    loss: torch.Tensor  # mean loss per trained unit (token, or pair for a preference objective)
    grad_norm: torch.Tensor
    trained_tokens: torch.Tensor  # trained units
    input_tokens: torch.Tensor
    overflow: torch.Tensor  # 1 if fp16 loss scaling skipped the update
    metrics: torch.Tensor  # the objective's metrics, means per unit (empty for next-token prediction)


class ReadBack(NamedTuple):
    """The last step of a read-back, and the input tokens of all the steps read."""

    loss: float
    grad_norm: float
    input_tokens: int
    metrics: dict  # the last step's objective metrics, by name


class StepGuard:
    """Checks each step read back: no trained tokens is an error; an fp16 overflow (the scaler
    skipped the update) is counted, and 30 in a row is an error; a NaN/inf loss or gradient norm
    is skipped up to train.skip_nonfinite times, then stops the run naming the last checkpoint."""

    def __init__(self, skip_nonfinite: int):
        self.skip_nonfinite = skip_nonfinite
        self.skipped = self.overflows = self.overflows_in_a_row = 0

    def check(self, stats: StepStats, s: int, last_ckpt: Path | None) -> None:
        loss, grad_norm, trained, overflow = stats.loss, stats.grad_norm, stats.trained_tokens, stats.overflow
        if trained == 0:
            raise PipelineError(f"step {s} has no trained tokens (every label is masked); check the data.")
        if math.isfinite(loss) and overflow:  # fp16 gradients overflowed: the scaler lowered its scale
            self.overflows += 1
            self.overflows_in_a_row += 1
            if self.overflows_in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
                raise PipelineError(
                    f"fp16 gradients overflowed {self.overflows_in_a_row} steps in a row (up to step {s}), "
                    "so they are not finite at any scale; lower train.lr or train in bf16/fp32."
                )
            return
        self.overflows_in_a_row = 0
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.skipped < self.skip_nonfinite:
            self.skipped += 1
            log.warning(
                "step %d: %s; update skipped (%d of train.skip_nonfinite=%d)",
                s,
                what,
                self.skipped,
                self.skip_nonfinite,
            )
            return
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
        raise PipelineError(
            f"the {what} at step {s} is not finite; {where}. Lower train.lr, raise train.warmup_steps, "
            f"check the data or allow skips with train.skip_nonfinite=N, then rerun (resume=auto "
            f"continues from the checkpoint)."
        )


@dataclass
class _Progress:
    """Where fit() is: counters, the steps not yet read back, and the timing of the last log."""

    step: int
    tokens_seen: int
    last_ckpt: Path | None
    pending: list = field(default_factory=list)
    t_last: float = field(default_factory=time.time)
    tokens_at_last: int = 0
    train_seconds: float = 0.0


class Trainer:
    """Runs spec.max_steps optimizer steps of a prepared launch; see run_training. Building one
    measures nothing: every start-of-run choice is in `launch` (choices.prepare_launch)."""

    def __init__(self, job: TrainingJob, launch: Launch):
        self.job, self.spec, self.choices, self.loss = job, launch.spec, launch.choices, launch.loss
        self.strategy, self.model, self.optimizer = launch.strategy, launch.model, launch.optimizer
        self.layout = self.strategy.layout
        self.ckpt_root = job.out_dir / "checkpoints"
        self.eval_data = job.eval_batches(self.layout.micro)
        device = self.strategy.device
        self.token_bytes = job.token_bytes.to(device, self.strategy.acc_dtype) if job.token_bytes is not None else None
        self.peak = peak_flops(device, self.strategy.precision)
        self.metrics: MetricsFile | None = None
        self.guard = StepGuard(self.spec.skip_nonfinite)
        self.strategy.init_trackers(job.tracking.project, job.tracking.config)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.strategy.unwrap(self.model)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss per token and bits per byte (text tokens only) over all ranks; for
        an objective, its mean loss and metrics per unit."""
        device, world = self.strategy.device, self.strategy.world
        t0 = time.time()
        self.model.eval()
        sums, n = 0.0, len(self.eval_data)
        for index in range(self.strategy.rank, -(-n // world) * world, world):
            # Every rank runs the same number of forwards: a sharded model's forward is collective.
            batch = {k: v.to(device) for k, v in self.eval_data[min(index, n - 1)].items()}
            with self.strategy.autocast():  # eager: a no-grad graph would be a second compilation
                batch_sums = eval_sums(self.job.objective, self.model, batch, self.strategy, self.token_bytes)
            if index < n:  # a padding pass only keeps the ranks in step
                sums = sums + batch_sums
        sums = self.strategy.sum_over_ranks(sums)
        self.model.train()
        if self.choices.budget is not None:
            self.choices.budget.eval_seconds = time.time() - t0
        return eval_result(self.job.objective, sums, self.token_bytes is not None)

    # -- one step ------------------------------------------------------------------------------
    def _step_batches(self, step: int) -> tuple[list[dict], torch.Tensor]:
        """This rank's micro-batches of global step `step`, on device, and their [trained, input]
        token counts (trained units for an objective) as a device tensor (counted there, so
        nothing waits for the GPU)."""
        micro, accum = self.layout.micro, self.layout.accum
        first = step * self.layout.global_seqs + self.strategy.rank * micro * accum
        device = self.strategy.device
        batches, counts = [], torch.zeros(2, dtype=torch.int64, device=device)
        for m in range(accum):
            b = to_device(self.job.train_batch(first + m * micro, micro), device)
            counts += self.job.objective.units(b) if self.job.objective else token_units(b)
            batches.append(b)
        return batches, counts

    def step(self, step: int) -> StepStats:
        """One optimizer step, its results left on the device: nothing here waits for the GPU
        (unless train.skip_nonfinite needs the loss before deciding to step)."""
        strategy = self.strategy
        batches, counts = self._step_batches(step)
        counts = strategy.sum_over_ranks(counts)
        acc = strategy.acc_dtype
        total = counts[0].to(acc)
        scale = (strategy.world / total.clamp(min=1)).float()
        for group in self.optimizer.param_groups:  # before backward: DeepSpeed steps inside it
            group["lr"] = lr_at(step, self.spec)
        sums = 0.0  # [loss, the objective's metrics...], summed over this rank's units
        for m, batch in enumerate(batches):
            with strategy.micro_step(self.model, last=m == len(batches) - 1):
                losses, metrics = with_metrics(self.loss(self.model, batch, strategy.loss_chunk_tokens))
                micro_sum = losses.sum()
                strategy.backward(micro_sum * scale)
            sums = sums + torch.cat([micro_sum.detach()[None], metrics.detach().sum(0)]).to(acc)
        grad_norm = strategy.clip_grad_norm(self.model)
        sums = strategy.sum_over_ranks(sums) / total
        loss, metrics = sums[0], sums[1:]
        # With fp16 loss scaling the scaler skips a non-finite update itself, and must see every
        # step to adjust its scale; otherwise a skip is ours to make.
        if (
            self.spec.skip_nonfinite
            and not strategy.scales_loss
            and not torch.isfinite(torch.stack([loss, grad_norm])).all()
        ):
            self.optimizer.zero_grad(set_to_none=True)  # skipping: never apply a NaN/inf update
            return StepStats(loss, grad_norm, total, counts[1].to(acc), torch.zeros_like(total), metrics)
        overflow = strategy.optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss, grad_norm, total, counts[1].to(acc), overflow, metrics)

    def read_back(self, pending: list[StepStats], step: int, last_ckpt: Path | None) -> ReadBack:
        """Read the steps since the last read (the last one is `step`) in one host sync and check
        each of them, so a NaN is reported at the step it happened."""
        flat = torch.stack([torch.cat([torch.stack(stats[:5]), stats.metrics]) for stats in pending]).tolist()
        rows = [StepStats(*row[:5], row[5:]) for row in flat]
        for s, row in enumerate(rows, start=step - len(rows) + 1):
            self.guard.check(row, s, last_ckpt)
        names = self.job.objective.metrics if self.job.objective else ()
        metrics = dict(zip(names, rows[-1].metrics))
        return ReadBack(rows[-1].loss, rows[-1].grad_norm, int(sum(r.input_tokens for r in rows)), metrics)

    # -- the run -------------------------------------------------------------------------------
    def _every(self, step: int, interval: int) -> bool:
        return bool(interval and step % interval == 0) or step == self.spec.max_steps

    def _checkpoint_due(self, step: int) -> bool:
        """Every ckpt_every steps, at the end, and where a wsd cooldown begins (an extended run
        resumes there)."""
        cooldown = self.spec.decay == "wsd" and step == decay_start(self.spec)
        return self._every(step, self.spec.ckpt_every) or cooldown

    def fit(self) -> dict:
        """Resume or start, train to max_steps, evaluate, checkpoint; returns the summary."""
        state = checkpoints.restore(
            self.strategy, self.ckpt_root, self.job.fingerprint, self.job.resume, partial(on_schedule, self.spec)
        )
        start = state["step"] if state else 0
        run = _Progress(start, state["tokens_seen"] if state else 0, state["path"] if state else None)
        run.train_seconds = start_seconds = state.get("train_seconds", 0.0) if state else 0.0
        run.tokens_at_last = start_tokens = run.tokens_seen
        self.metrics = MetricsFile(self.job.out_dir / "metrics.jsonl", self.strategy.is_main)
        self.metrics.keep_until(start or None)
        summary = {"start_step": start, **self._initial_evaluation(start)}
        self.model.train()  # a base from from_pretrained is in eval mode, and a resume skips the first evaluation
        run.t_last = time.time()  # evaluation time is not training time
        with StopSignal() as stop, _progress_bar(self.spec.max_steps, start, self.strategy.is_main) as bar:
            while run.step < self.spec.max_steps:
                run.pending.append(self.step(run.step))
                run.step += 1
                bar.update(1)
                if self.choices.budget_open(self.spec, run.step, self._read_due(run.step, stop)):
                    self._apply_budget(run.step, bar)
                if self._read_due(run.step, stop):  # after the budget: it may have made this the last step
                    self._at_read_step(run, stop, bar, summary)
        if "final" not in summary:  # resumed at the last step: nothing left to train, still report
            summary["final"] = self.evaluate()
        self.strategy.end_trackers()
        self.choices.budget_report(self.spec, self.job.started, start > 0)
        seconds = run.train_seconds - start_seconds  # this session's; train_seconds counts since step 0
        summary.update(
            steps=run.step,
            tokens_seen=run.tokens_seen,
            train_seconds=round(run.train_seconds, 1),
            tokens_per_s=round((run.tokens_seen - start_tokens) / max(seconds, 1e-9), 1),
            last_checkpoint=str(run.last_ckpt) if run.last_ckpt else None,
            skipped_steps=self.guard.skipped,
            fp16_overflow_steps=self.guard.overflows,
            launch=self.choices.manifest(self.strategy, is_compiled(self.loss)),
        )
        return summary

    def _apply_budget(self, step: int, bar) -> None:
        """Fix max_steps once the time budget has timed enough steps, or move it to keep the pace (the
        main process decides)."""
        self.strategy.synchronize()
        steps = self.choices.budget_steps(self.spec, step, self.job.spec.max_steps, self.strategy.broadcast)
        if steps is not None:
            self.spec = with_max_steps(self.spec, steps)
            bar.total = steps
            bar.refresh()

    def _initial_evaluation(self, start: int) -> dict:
        """{"initial": step-0 validation}: measured on a fresh run, read from metrics.jsonl on a resumed one."""
        if start == 0:
            first = self.evaluate()
            self.metrics.write({"step": 0, **first})
            log.info("step 0: val loss %.4f%s", first["val_loss"], _bpb(first))
        else:
            first = next((r for r in self.metrics.rows() if r.get("step") == 0 and "val_loss" in r), None)
        return {"initial": {k: v for k, v in first.items() if k != "step"}} if first else {}

    def _read_due(self, step: int, stop: StopSignal) -> bool:
        """Device values are read back (one host sync) only when something needs them."""
        spec = self.spec
        signalled = self.strategy.world == 1 and stop.signum is not None  # several ranks agree at read steps
        return (
            self._every(step, spec.log_every)
            or self._every(step, spec.eval_every)
            or self._checkpoint_due(step)
            or bool(spec.skip_nonfinite)
            or signalled
        )

    def _at_read_step(self, run: _Progress, stop: StopSignal, bar, summary: dict) -> None:
        """Check and log the pending steps, evaluate, checkpoint, and stop on a signal."""
        spec, step = self.spec, run.step
        back = self.read_back(run.pending, step, run.last_ckpt)
        loss = back.loss
        run.tokens_seen += back.input_tokens
        run.pending = []
        if self._every(step, spec.log_every):
            self._log_train(run, back, bar)
        if self._every(step, spec.eval_every):
            summary["final"] = ev = self.evaluate()
            self._record(ev, step)
            log.info("step %d: train loss %.4f, val loss %.4f%s", step, loss, ev["val_loss"], _bpb(ev))
            run.t_last = time.time()  # evaluation time is not training time
        stopping = self.strategy.any_rank(stop.signum is not None)
        if self._checkpoint_due(step) or stopping:
            state = {
                "step": step,
                "tokens_seen": run.tokens_seen,
                "train_seconds": run.train_seconds,
                "fingerprint": self.job.fingerprint,
                **self.choices.for_checkpoint(self.spec, self.strategy, is_compiled(self.loss)),
                "cooldown_start": self.spec.decay == "wsd" and step == decay_start(self.spec),
            }
            t0 = time.time()
            run.last_ckpt = checkpoints.save(self.strategy, self.ckpt_root, state, spec.keep_checkpoints, run.last_ckpt)
            run.t_last = time.time()  # a checkpoint is not training time; a time budget counts it
            if self.choices.budget is not None:
                self.choices.budget.saved(run.t_last - t0)
            if self.strategy.is_main:
                mb = checkpoints.size_of(run.last_ckpt) / 1e6
                log.info("checkpoint %s: %.1f MB in %.1fs", run.last_ckpt, mb, run.t_last - t0)
        if stopping:
            raise TrainingStopped(step, run.last_ckpt)

    def _log_train(self, run: _Progress, back: ReadBack, bar) -> None:
        now = time.time()
        seconds = now - run.t_last
        run.train_seconds += seconds
        tps = (run.tokens_seen - run.tokens_at_last) / max(seconds, 1e-9)
        row = {
            "loss": back.loss,
            **back.metrics,
            "lr": lr_at(run.step - 1, self.spec),
            "grad_norm": back.grad_norm,
            "tokens_per_s": tps,
            "tokens_seen": run.tokens_seen,
            "train_seconds": round(run.train_seconds, 3),
            "peak_mem_gb": peak_memory_gb(self.strategy.device),
        }
        used = mfu(self.job.flops_per_token, tps, self.peak, self.strategy.world)
        if used is not None:
            row["mfu"] = used
        self._record(row, run.step)
        shown = {"acc": f"{back.metrics['reward_accuracy']:.2f}"} if "reward_accuracy" in back.metrics else {}
        bar.set_postfix(loss=f"{back.loss:.3f}", **shown, tok_s=f"{tps:,.0f}")
        run.t_last, run.tokens_at_last = time.time(), run.tokens_seen

    def _record(self, row: dict, step: int) -> None:
        self.metrics.write({"step": step, **row})
        self.strategy.log_to_trackers(row, step)


def with_metrics(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit losses, unit metrics) of what a step's loss function returned: an objective's pair,
    or next-token losses (no metrics)."""
    return out if isinstance(out, tuple) else (out, out.new_zeros((1, 0)))


def token_units(batch: dict) -> torch.Tensor:
    """[trained tokens, input tokens] of a next-token batch, on its device."""
    trained = (batch["labels"] != IGNORE).sum()
    inputs = (
        batch["attention_mask"].sum() if "attention_mask" in batch else trained.new_tensor(batch["input_ids"].numel())
    )
    return torch.stack([trained, inputs])


def eval_sums(objective, model, batch: dict, strategy, token_bytes: torch.Tensor | None) -> torch.Tensor:
    """One validation batch's sums: [loss, tokens, text loss, bytes] of next-token prediction, or
    [loss, units, metrics...] of an objective."""
    acc, chunk = strategy.acc_dtype, strategy.loss_chunk_tokens
    if objective is not None:
        losses, metrics = objective(model, batch, chunk)
        return torch.cat([losses.sum()[None], losses.new_tensor([len(losses)]), metrics.sum(0)]).to(acc)
    losses = token_losses(model, batch, chunk).to(acc)
    mask = batch["labels"] != IGNORE
    zero = losses.new_zeros(())
    sums = [losses[mask].sum(), mask.sum().to(acc), zero, zero]
    if token_bytes is not None:
        nbytes = token_bytes[batch["labels"].clamp(min=0)] * mask
        sums[2:] = losses[nbytes > 0].sum(), nbytes.sum().to(acc)
    return torch.stack(sums)


def eval_result(objective, sums: torch.Tensor, bpb: bool) -> dict:
    """The validation figures from eval_sums summed over batches and ranks."""
    units = sums[1].clamp(min=1)
    out = {"val_loss": (sums[0] / units).item()}
    if objective is not None:
        out |= {f"val_{name}": v for name, v in zip(objective.metrics, (sums[2:] / units).tolist())}
    elif bpb:
        out["val_bpb"] = bits_per_byte(sums[2].item(), int(sums[3].item()))
    return out


def _progress_bar(total: int, initial: int, is_main: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, disable=None if is_main else True)


def _bpb(ev: dict) -> str:
    """What the log line adds to the validation loss: bits per byte, or the preference metrics."""
    if "val_reward_accuracy" in ev:
        return f", reward accuracy {ev['val_reward_accuracy']:.3f}, margin {ev['val_reward_margin']:.4f}"
    return f", val bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
