"""The one training loop, shared by pretrain and finetune: `run_training(job, publish)`.

A step: this rank's micro-batches, forward + backward each (gradients synced on the last),
clip, AdamW. The loop asks the Strategy everything that depends on the launch. A step leaves its
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from pipeline.config.train import TrainSpec
from pipeline.errors import PipelineError, TrainingStopped
from pipeline.model.build import count_params
from pipeline.train import checkpoints
from pipeline.train.autotune import (
    TimeBudget,
    candidates,
    measure_compile,
    measure_precision,
)
from pipeline.train.bpb import bits_per_byte
from pipeline.train.layout import batch_layout
from pipeline.train.loss import IGNORE, token_losses
from pipeline.train.memory import freed_memory_kept, peak_memory_gb
from pipeline.train.metrics_file import MetricsFile
from pipeline.train.optim import decay_start, lr_at
from pipeline.train.preflight import report
from pipeline.train.signals import StopSignal
from pipeline.train.strategy import CompiledOrEager, Strategy, to_device
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
    batch: Callable[[int, int], dict]  # (first global sample, count) -> {"input_ids", "labels", ...}
    eval_batches: Callable[[int], list[dict]]  # micro-batch size -> the fixed validation batches
    token_bytes: torch.Tensor | None = None  # (vocab,) bytes per token: enables bits per byte
    flops_per_token: float | None = None  # enables MFU on GPUs with a known peak
    resume: str = "auto"  # auto | never
    tracking: Tracking = field(default_factory=Tracking)
    fixed_shapes: bool = True  # every training batch has the same shape (not so for unpacked chat rows)


def run_training(job: TrainingJob, publish: Callable[[torch.nn.Module, dict], None]) -> dict:
    """Train, then call publish(model, consolidated state dict) on the main process; returns the
    summary (initial/final evaluation, steps, tokens, speed, and the launch's facts)."""
    with freed_memory_kept(PartialState().device.type == "cpu"):  # before measuring: it changes timings
        trainer = Trainer(job)
        summary = trainer.fit()
    state_dict = trainer.strategy.consolidated_state_dict(trainer.model)
    if trainer.strategy.is_main:
        publish(trainer.unwrapped_model, state_dict)
    trainer.strategy.wait()
    return summary


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
    """Runs job.spec.max_steps optimizer steps of job.model; see run_training."""

    def __init__(self, job: TrainingJob):
        self.started = time.time()
        self.job, self.spec = job, job.spec
        self.ckpt_root = job.out_dir / "checkpoints"
        stored = checkpoints.peek(self.ckpt_root, job.fingerprint, self._same_budget if self.spec.time_budget else None) \
            if job.resume != "never" else {}
        device = PartialState().device.type
        same_device = stored.get("precision_device") == device
        self.precision_choice = self._choose_precision(stored.get("precision") if same_device else None)
        self.strategy = Strategy(job.spec, job.out_dir, job.tracking.trackers, self.precision_choice["choice"])
        self.budget, self.budget_facts = None, None
        if self.spec.time_budget and stored.get("max_steps"):  # decided before the checkpoint: keep it
            self._set_max_steps(stored["max_steps"])
            self.budget_facts = {"seconds": self.spec.budget_seconds, "steps": stored["max_steps"],
                                 "kept_from_checkpoint": True}
        elif self.spec.time_budget:  # a run resumed before deciding goes on with what it had spent
            self.budget = TimeBudget(
                self.spec.budget_seconds, self.started - stored.get("budget_spent", 0.0),
                self.spec.warmup_steps, self.spec.eval_every, stored.get("step", 0), self.spec.decay == "constant",
                stored.get("eval_seconds", 0.0))
        self.model, self.optimizer = self.strategy.setup(job.model)
        self.layout = self.strategy.layout
        self.compile_choice = self._choose_compile(stored.get("compile") if same_device else None)
        self.eval_data = job.eval_batches(self.layout.micro)
        device = self.strategy.device
        self.token_bytes = job.token_bytes.to(device, self.strategy.acc_dtype) if job.token_bytes is not None else None
        self.peak = peak_flops(device, self.strategy.precision)
        self.metrics: MetricsFile | None = None
        self._skipped = self._overflows = self._overflows_in_a_row = 0
        acc = self.strategy.accelerator
        if job.tracking.trackers:
            acc.init_trackers(job.tracking.project, config=job.tracking.config)
        log.info(
            "batch: %d sequences x %d tokens = %d tokens/step = %d processes x %d micro-batch x %d accumulation; "
            "precision %s%s on %s, strategy %s",
            self.layout.global_seqs, self.spec.seq_len, self.spec.batch_tokens, self.strategy.world,
            self.layout.micro, self.layout.accum, self.strategy.precision,
            ", compiled" if self.strategy.compiled_losses else "", device, self.strategy.name,
        )

    def _choose_precision(self, stored: str | None) -> dict:
        """train.mixed_precision, or for auto: as stored with this run's checkpoints, else measured
        on this machine (the main process's measurement, for every rank)."""
        spec, job = self.spec, self.job
        if spec.mixed_precision != "auto":
            return {"choice": spec.mixed_precision, "measured": False}
        if stored:
            return {"choice": stored, "measured": False, "reason": "as chosen at the start of this run"}
        state = PartialState()
        if len(candidates(state.device)) == 1:
            return {"choice": candidates(state.device)[0], "measured": False}
        per_rank = batch_layout(spec, state.num_processes, 1).global_seqs // state.num_processes
        micro = min(spec.micro_batch_size if isinstance(spec.micro_batch_size, int) else 4, per_rank)
        batch = to_device(job.batch(state.process_index * micro, micro), state.device)
        result = measure_precision(job.model.to(state.device), batch, state.device,
                                   spec.max_steps * per_rank // micro, spec.budget_seconds, spec.loss_chunk_tokens)
        if state.num_processes > 1:
            result = broadcast_object_list([result], from_process=0)[0]
        label = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
        if result["measured"]:
            timings = ", ".join(f"{label[p]} {t:.3f}s" for p, t in result["seconds"].items())
            log.info("precision: %s, measured on this machine (%s per forward+backward of %d x %d tokens; a half "
                     "precision must be 5%% faster); set train.mixed_precision to choose", label[result["choice"]],
                     timings, micro, spec.seq_len)
        else:
            log.info("precision: %s (%s)", label[result["choice"]], result.get("reason", ""))
        return result

    def _choose_compile(self, stored: bool | None) -> dict:
        """train.compile, or for auto: as stored with this run's checkpoints, else measured on this
        machine: the loss eager against compiled with the model, on a real micro-batch, where the
        run is long enough to repay trying (the main process's decision, for every rank)."""
        spec, strategy = self.spec, self.strategy
        if spec.compile != "auto":
            return {"choice": bool(spec.compile), "measured": False}
        if stored is not None:
            result = {"choice": stored, "measured": False, "reason": "as chosen at the start of this run"}
        elif not self.job.fixed_shapes:
            result = {"choice": False, "measured": False, "reason": "batches vary in width (unpacked chat rows), and "
                      "each new width would compile again; finetune.packing=true gives fixed rows"}
        elif strategy.sharded:  # DeepSpeed's backward is the engine's, not the loss's: no timed passes
            on = strategy.device.type == "cuda"
            result = {"choice": on, "measured": False,
                      "reason": f"not measured under {strategy.name}" + ("; on, as it wins on GPUs" if on else "")}
        else:
            micro = self.layout.micro
            batch = to_device(self.job.batch(strategy.rank * micro, micro), strategy.device)
            compiled = CompiledOrEager(token_losses)
            strategy.compiled_losses = compiled

            def agree(decision):
                return broadcast_object_list([decision], from_process=0)[0] if strategy.world > 1 else decision

            with strategy.accelerator.autocast():
                result = measure_compile(lambda: strategy.losses(batch, train=False), lambda: strategy.losses(batch),
                                         self.model, strategy.device, spec.max_steps * self.layout.accum,
                                         spec.budget_seconds, agree)
            if compiled.compiled is None:  # it failed, and said so
                result = {"choice": False, "measured": True, "reason": "compiling failed"}
            result = agree(result)
        strategy.compiled_losses = (strategy.compiled_losses or CompiledOrEager(token_losses)) if result["choice"] else None
        if result["measured"] and "seconds" in result:
            t = result["seconds"]
            log.info("compile: %s, measured on this machine (eager %.3fs, compiled %.3fs per forward+backward after "
                     "%.0fs compiling; compiling must be 5%% faster); set train.compile to choose",
                     "on" if result["choice"] else "off", t["eager"], t["compiled"], result["compile_seconds"])
        else:
            log.info("compile: %s (%s)", "on" if result["choice"] else "off", result.get("reason", "train.compile"))
        return result

    def _choices(self) -> dict:
        """What this run decided at its start, for its checkpoints: a resume keeps it."""
        choices = {"precision": self.strategy.precision, "precision_device": self.strategy.device.type,
                   "compile": self.strategy.describe()["compiled"], "schedule_steps": self.spec.max_steps}
        if self.spec.time_budget and self.budget is None:
            choices.update(max_steps=self.spec.max_steps, budget_seconds=self.spec.budget_seconds)
        elif self.budget is not None:
            choices.update(budget_spent=time.time() - self.budget.started, eval_seconds=self.budget.eval_seconds)
        return choices

    def _on_schedule(self, state: dict) -> bool:
        """Whether a checkpoint of this config lies on this run's learning-rate schedule: trained
        for the same step count, or stopped before a different one changes the rate. An extended
        wsd run so resumes before its old cooldown and redoes it (exactly a longer run); a cosine
        or linear run resumes from its newest checkpoint with the rate of the new schedule."""
        step, trained_for = state["step"], state.get("schedule_steps", self.spec.max_steps)
        if step > self.spec.max_steps or (self.spec.time_budget and not self._same_budget(state)):
            return False
        if trained_for == self.spec.max_steps or self.spec.decay == "constant":
            return True
        if self.spec.decay == "wsd":
            return step <= min(decay_start(self.spec, trained_for), decay_start(self.spec))
        if trained_for > self.spec.max_steps:  # a shorter cosine run never reuses a longer one's undecayed steps
            return False
        log.warning("resuming step %d of a %d-step %s schedule for %d steps: the learning rate follows the new "
                    "schedule from here, so this is not the run a straight %d steps would be (train.decay=wsd "
                    "makes runs extendable exactly)", step, trained_for, self.spec.decay, self.spec.max_steps,
                    self.spec.max_steps)
        return True

    def _same_budget(self, state: dict) -> bool:
        """A budgeted run resumes only checkpoints of its own budget: its step count decided with
        the same budget, or written before deciding."""
        if "budget_seconds" in state:
            return state["budget_seconds"] == self.spec.budget_seconds
        return "budget_spent" in state

    def _set_max_steps(self, steps: int) -> None:
        self.spec = replace(self.spec, max_steps=steps, key=self.spec._key)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.strategy.accelerator.unwrap_model(self.model)

    def _log_preflight(self) -> None:
        cfg = self.unwrapped_model.config
        for line in report(
            params=count_params(self.model), trainable=count_params(self.model, trainable_only=True),
            flops_per_token=self.job.flops_per_token, n_layer=getattr(cfg, "num_hidden_layers", 1),
            d_model=getattr(cfg, "hidden_size", 1), vocab=getattr(cfg, "vocab_size", 1),
            micro_tokens=self.layout.micro * self.spec.seq_len, world=self.strategy.world,
            half=self.strategy.precision in ("bf16", "fp16"), checkpointing=self.spec.activation_checkpointing,
            budget_tokens=None if self.spec.time_budget else self.spec.max_steps * self.spec.batch_tokens,
            peak_flops=self.peak,
        ):
            log.info(line)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss per token and bits per byte (text tokens only) over all ranks."""
        device, world = self.strategy.device, self.strategy.world
        t0 = time.time()
        self.model.eval()
        acc = self.strategy.acc_dtype
        sums = torch.zeros(4, dtype=acc, device=device)  # loss, tokens, text loss, bytes
        n = len(self.eval_data)
        for index in range(self.strategy.rank, -(-n // world) * world, world):
            # Every rank runs the same number of forwards: a sharded model's forward is collective.
            batch = {k: v.to(device) for k, v in self.eval_data[min(index, n - 1)].items()}
            with self.strategy.accelerator.autocast():
                losses = self.strategy.losses(batch, train=False).to(acc)
            if index >= n:
                continue  # a padding pass, only to keep the ranks in step
            mask = batch["labels"] != IGNORE
            sums[0] += losses[mask].sum()
            sums[1] += mask.sum()
            if self.token_bytes is not None:
                nbytes = self.token_bytes[batch["labels"].clamp(min=0)] * mask
                sums[2] += losses[nbytes > 0].sum()
                sums[3] += nbytes.sum()
        sums = self.strategy.sum_over_ranks(sums)
        self.model.train()
        out = {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()}
        if self.token_bytes is not None:
            out["val_bpb"] = bits_per_byte(sums[2].item(), int(sums[3].item()))
        if self.budget is not None:
            self.budget.eval_seconds = time.time() - t0
        return out

    # -- one step ------------------------------------------------------------------------------
    def _step_batches(self, step: int) -> tuple[list[dict], torch.Tensor]:
        """This rank's micro-batches of global step `step`, on device, and their [trained, input]
        token counts as a device tensor (counted there, so nothing waits for the GPU)."""
        micro, accum = self.layout.micro, self.layout.accum
        first = step * self.layout.global_seqs + self.strategy.rank * micro * accum
        device = self.strategy.device
        batches, counts = [], torch.zeros(2, dtype=torch.int64, device=device)
        for m in range(accum):
            b = to_device(self.job.batch(first + m * micro, micro), device)
            counts[0] += (b["labels"] != IGNORE).sum()
            counts[1] += b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
            batches.append(b)
        return batches, counts

    def _train_step(self, step: int) -> torch.Tensor:
        """One optimizer step. Returns [mean loss per trained token, grad norm, trained tokens, input
        tokens, 1 if fp16 loss scaling skipped the update] as one device tensor: nothing here waits
        for the GPU (unless train.skip_nonfinite needs the loss before deciding to step)."""
        strategy = self.strategy
        batches, counts = self._step_batches(step)
        counts = strategy.sum_over_ranks(counts)
        acc = strategy.acc_dtype
        total = counts[0].to(acc)
        scale = (strategy.world / total.clamp(min=1)).float()
        for group in self.optimizer.param_groups:  # before backward: DeepSpeed steps inside it
            group["lr"] = lr_at(step, self.spec)
        loss_sum = torch.zeros((), dtype=acc, device=strategy.device)
        for m, batch in enumerate(batches):
            with strategy.micro_step(self.model, last=m == len(batches) - 1):
                micro_sum = strategy.losses(batch).sum()
                strategy.backward(micro_sum * scale)
            loss_sum += micro_sum.detach().to(acc)
        grad_norm = strategy.clip_grad_norm(self.model)
        stats = [strategy.sum_over_ranks(loss_sum) / total, grad_norm, total, counts[1].to(acc)]
        # With fp16 loss scaling the scaler skips a non-finite update itself, and must see every
        # step to adjust its scale; otherwise a skip is ours to make.
        if self.spec.skip_nonfinite and not strategy.scales_loss and not torch.isfinite(torch.stack(stats[:2])).all():
            self.optimizer.zero_grad(set_to_none=True)  # skipping: never apply a NaN/inf update
            return torch.stack([*stats, torch.zeros_like(total)])
        overflow = strategy.optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([*stats, overflow])

    def _read_back(self, pending: list[torch.Tensor], step: int, last_ckpt: Path | None) -> tuple[float, float, int]:
        """Read the steps since the last read in one host sync and check each of them, so a NaN is
        reported at the step it happened. Returns (last loss, last grad norm, input tokens)."""
        rows = torch.stack(pending).tolist()
        for s, (loss, grad_norm, trained, _, overflow) in enumerate(rows, start=step - len(rows) + 1):
            if trained == 0:
                raise PipelineError(f"step {s} has no trained tokens (every label is masked); check the data.")
            if math.isfinite(loss) and overflow:  # fp16 gradients overflowed: the scaler lowered its scale
                self._overflows += 1
                self._overflows_in_a_row += 1
                if self._overflows_in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
                    raise PipelineError(
                        f"fp16 gradients overflowed {self._overflows_in_a_row} steps in a row (up to step {s}), "
                        "so they are not finite at any scale; lower train.lr or train in bf16/fp32."
                    )
                continue
            self._overflows_in_a_row = 0
            if math.isfinite(loss) and math.isfinite(grad_norm):
                continue
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            if self._skipped < self.spec.skip_nonfinite:
                self._skipped += 1
                log.warning("step %d: %s; update skipped (%d of train.skip_nonfinite=%d)",
                            s, what, self._skipped, self.spec.skip_nonfinite)
                continue
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
            raise PipelineError(
                f"the {what} at step {s} is not finite; {where}. Lower train.lr, raise train.warmup_steps, "
                f"check the data or allow skips with train.skip_nonfinite=N, then rerun (resume=auto "
                f"continues from the checkpoint)."
            )
        loss, grad_norm = rows[-1][:2]
        return loss, grad_norm, int(sum(r[3] for r in rows))

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
        self._log_preflight()
        state = checkpoints.restore(self.strategy, self.ckpt_root, self.job.fingerprint, self.job.resume,
                                    self._on_schedule)
        start = state["step"] if state else 0
        run = _Progress(start, state["tokens_seen"] if state else 0, state["path"] if state else None)
        run.train_seconds = start_seconds = state.get("train_seconds", 0.0) if state else 0.0
        run.tokens_at_last = start_tokens = run.tokens_seen
        self.metrics = MetricsFile(self.job.out_dir / "metrics.jsonl", self.strategy.is_main)
        self.metrics.keep_until(start or None)
        summary = {"start_step": start, **self._initial_evaluation(start)}
        self.model.train()  # a base from from_pretrained is in eval mode, and a resume skips the first evaluation
        run.t_last = time.time()  # evaluation time is not training time
        with StopSignal() as stop, tqdm(total=self.spec.max_steps, initial=start, desc="train", dynamic_ncols=True,
                                         disable=None if self.strategy.is_main else True) as bar:
            while run.step < self.spec.max_steps:
                run.pending.append(self._train_step(run.step))
                run.step += 1
                bar.update(1)
                if self.budget is not None:
                    self._apply_budget(run.step, bar)
                if self._read_due(run.step, stop):
                    self._at_read_step(run, stop, bar, summary)
        if "final" not in summary:  # resumed at the last step: nothing left to train, still report
            summary["final"] = self.evaluate()
        if self.strategy.accelerator.trackers:
            self.strategy.accelerator.end_training()
        seconds = run.train_seconds - start_seconds  # this session's; train_seconds counts since step 0
        summary.update(steps=run.step, tokens_seen=run.tokens_seen, train_seconds=round(run.train_seconds, 1),
                       tokens_per_s=round((run.tokens_seen - start_tokens) / max(seconds, 1e-9), 1),
                       last_checkpoint=str(run.last_ckpt) if run.last_ckpt else None, skipped_steps=self._skipped,
                       fp16_overflow_steps=self._overflows,
                       launch=dict(self.strategy.describe(), precision_choice=self.precision_choice,
                                   compile_choice=self.compile_choice,
                                   time_budget=self.budget_facts))
        return summary

    def _apply_budget(self, step: int, bar) -> None:
        """Fix max_steps once the time budget has timed enough steps (the main process decides)."""
        self.strategy.synchronize()
        cap = self.job.spec.max_steps
        steps = self.budget.steps(step, time.time(), cap)
        if steps is None:
            return
        steps = self.strategy.from_main(steps)
        self._set_max_steps(steps)
        bar.total = steps
        bar.refresh()
        self.budget_facts = facts = dict(self.budget.facts, steps=steps)
        log.info("time budget %s: %.3fs per step, %.1fs per evaluation -> %d steps%s", self.spec.time_budget,
                 facts["step_seconds"], facts["eval_seconds"], steps, " (train.max_steps caps it)" if steps == cap else "")
        self.budget = None

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
        return (self._every(step, spec.log_every) or self._every(step, spec.eval_every)
                or self._checkpoint_due(step) or bool(spec.skip_nonfinite) or signalled)

    def _at_read_step(self, run: _Progress, stop: StopSignal, bar, summary: dict) -> None:
        """Check and log the pending steps, evaluate, checkpoint, and stop on a signal."""
        spec, step = self.spec, run.step
        loss, grad_norm, tokens = self._read_back(run.pending, step, run.last_ckpt)
        run.tokens_seen += tokens
        run.pending = []
        if self._every(step, spec.log_every):
            self._log_train(run, loss, grad_norm, bar)
        if self._every(step, spec.eval_every):
            summary["final"] = ev = self.evaluate()
            self._record(ev, step)
            log.info("step %d: train loss %.4f, val loss %.4f%s", step, loss, ev["val_loss"], _bpb(ev))
            run.t_last = time.time()  # evaluation time is not training time
        stopping = self.strategy.any_rank(stop.signum is not None)
        if self._checkpoint_due(step) or stopping:
            state = {"step": step, "tokens_seen": run.tokens_seen, "train_seconds": run.train_seconds,
                     "fingerprint": self.job.fingerprint, **self._choices(),
                     "cooldown_start": self.spec.decay == "wsd" and step == decay_start(self.spec)}
            run.last_ckpt = checkpoints.save(self.strategy, self.ckpt_root, state, spec.keep_checkpoints, run.last_ckpt)
            run.t_last = time.time()
        if stopping:
            raise TrainingStopped(step, run.last_ckpt)

    def _log_train(self, run: _Progress, loss: float, grad_norm: float, bar) -> None:
        now = time.time()
        seconds = now - run.t_last
        run.train_seconds += seconds
        tps = (run.tokens_seen - run.tokens_at_last) / max(seconds, 1e-9)
        row = {"loss": loss, "lr": lr_at(run.step - 1, self.spec), "grad_norm": grad_norm, "tokens_per_s": tps,
               "tokens_seen": run.tokens_seen, "train_seconds": round(run.train_seconds, 3),
               "peak_mem_gb": peak_memory_gb(self.strategy.device)}
        used = mfu(self.job.flops_per_token, tps, self.peak, self.strategy.world)
        if used is not None:
            row["mfu"] = used
        self._record(row, run.step)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        run.t_last, run.tokens_at_last = time.time(), run.tokens_seen

    def _record(self, row: dict, step: int) -> None:
        self.metrics.write({"step": step, **row})
        if self.strategy.accelerator.trackers:
            self.strategy.accelerator.log(row, step=step)


def _bpb(ev: dict) -> str:
    return f", val bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
