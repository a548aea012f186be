"""The one training loop, shared by pretrain and finetune, on Accelerate.

The strategy (single device, DDP, FSDP, DeepSpeed) comes from `accelerate launch`, not from
here. The loop owns: batch derivation from a global batch in tokens, AdamW with warmup+decay,
gradient accumulation, clipping, logging (tokens/s, MFU, memory), validation loss and bits per
byte, checkpoints with exact resume, and stopping cleanly on SIGTERM/SIGINT or a NaN loss.

Loss normalisation: every micro-batch adds sum(token losses) * world / (trained tokens in the
whole global step). Gradient averaging across ranks then gives the mean over all trained tokens
of the step, so 1 process, N processes and any accumulation split give the same update.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.checkpoints import clear_temps, latest_checkpoint, step_dir, write_checkpoint_state
from pipeline.errors import PipelineError, TrainingStopped
from pipeline.metrics import MetricsFile, bits_per_byte, peak_flops, peak_memory_gb
from pipeline.modeling import count_params
from pipeline.preflight import activation_bytes, divisors_desc, find_micro_batch, report
from pipeline.train_setup import (
    TrainSpec,
    batch_layout,
    has_accelerator,
    lr_at,
    make_optimizer,
    resolve_mixed_precision,
)

log = logging.getLogger("pipeline")
IGNORE = -100


def token_losses(model, batch: dict) -> torch.Tensor:
    """Per-token cross entropy in fp32 (0 where labels are IGNORE)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits  # no cache: packed position ids then split attention
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(batch["labels"])


class CompiledOrEager:
    """torch.compile the model; if compiling fails (no C++ compiler, an unsupported op), say so
    once and run eagerly rather than losing the run."""

    def __init__(self, model):
        self.model, self.compiled = model, torch.compile(model)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # inductor/dynamo raise many types
                message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                log.warning("torch.compile failed (%s: %s); continuing without compilation", type(e).__name__, message)
                self.compiled = None
        return self.model(*args, **kwargs)


class _StopSignal:
    """Remember SIGTERM/SIGINT; the loop checkpoints and stops at the next step boundary."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Trainer:
    """Run `spec.max_steps` optimizer steps of `model` on batches from `batch_fn`.

    batch_fn(first_sample, size) -> {"input_ids", "labels", ...} gives global samples
    [first_sample, first_sample + size); eval_batches are fixed validation batches (or a function
    of the micro-batch size that makes them), with an optional `token_bytes` (vocab,) tensor so
    that bits per byte can be reported.
    """

    def __init__(
        self, model, spec: TrainSpec, out_dir: Path, batch_fn: Callable[[int, int], dict],
        eval_batches: list[dict] | Callable[[int], list[dict]], fingerprint: str, token_bytes: torch.Tensor | None = None,
        resume: str = "auto", trackers: tuple[str, ...] = (), tracker_config: dict | None = None,
        project: str = "pipeline",
    ):
        self.spec, self.out_dir, self.batch_fn = spec, out_dir, batch_fn
        self.fingerprint, self.resume = fingerprint, resume
        self.ckpt_root = out_dir / "checkpoints"
        self.accelerator = Accelerator(
            cpu=not has_accelerator(),
            mixed_precision=resolve_mixed_precision(spec.mixed_precision),
            log_with=list(trackers) or None,
            project_dir=str(out_dir),
        )
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        if self.world > 1:  # every rank reports in: after a hang, the missing line names the culprit
            print(f"[pipeline] rank {self.rank}/{self.world} ready on {acc.device} (pid {os.getpid()}, "
                  f"host {socket.gethostname()})", file=sys.stderr, flush=True)
        if spec.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        micro = self._auto_micro_batch(model) if spec.micro_batch_size == "auto" else None
        self.global_seqs, self.micro, self.accum = batch_layout(spec, self.world, micro)
        self.eval_data = eval_batches(self.micro) if callable(eval_batches) else eval_batches
        fused = acc.device.type == "cuda"
        self.model, self.optimizer = acc.prepare(model, make_optimizer(model, spec, fused))
        self.forward_model = CompiledOrEager(self.model) if spec.compile else self.model
        self.token_bytes = token_bytes.to(acc.device) if token_bytes is not None else None
        self.peak = peak_flops(acc.device)
        if trackers:
            acc.init_trackers(project, config=tracker_config or {})
        log.info(
            "batch: %d sequences x %d tokens = %d tokens/step = %d processes x %d micro-batch x %d accumulation; "
            "precision %s%s on %s, strategy %s",
            self.global_seqs, spec.seq_len, spec.batch_tokens, self.world, self.micro, self.accum,
            acc.mixed_precision, ", compiled" if spec.compile else "", acc.device,
            str(acc.distributed_type).split(".")[-1],
        )

    def _auto_micro_batch(self, model) -> int:
        """Largest micro-batch that fits, agreed by all ranks (the minimum). GPUs probe a real
        forward+backward with OOM back-off; CPUs cap it at a quarter of free RAM (an OOM there
        kills the process instead of raising)."""
        acc, spec = self.accelerator, self.spec
        global_seqs, _, _ = batch_layout(spec, self.world, micro_batch=1)  # validates the split first
        per_rank = global_seqs // self.world
        cfg = model.config
        half = acc.mixed_precision in ("bf16", "fp16")

        def act(size):
            return activation_bytes(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, size * spec.seq_len,
                                    half, spec.activation_checkpointing)

        cap = None
        if acc.device.type == "cpu":
            free = psutil.virtual_memory().available
            cap = max([d for d in divisors_desc(per_rank) if act(d) <= free / 4] or [1])
        model.to(acc.device)
        gen = torch.Generator().manual_seed(0)

        def probe(size):
            ids = torch.randint(0, cfg.vocab_size, (size, spec.seq_len + 1), generator=gen).to(acc.device)
            with acc.autocast():
                loss = token_losses(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        size = torch.tensor(find_micro_batch(per_rank, probe, cap), device=acc.device)
        if self.world > 1:
            torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN)
        log.info("micro_batch_size=auto: %d sequences per device fit", int(size))
        return int(size)

    def preflight(self, flops_per_token: float | None) -> None:
        cfg = self.accelerator.unwrap_model(self.model).config
        for line in report(
            count_params(self.model), count_params(self.model, trainable_only=True), flops_per_token,
            getattr(cfg, "num_hidden_layers", 1), getattr(cfg, "hidden_size", 1), getattr(cfg, "vocab_size", 1),
            self.micro * self.spec.seq_len, self.world, self.accelerator.mixed_precision in ("bf16", "fp16"),
            self.spec.activation_checkpointing, self.spec.max_steps * self.spec.batch_tokens, self.peak,
        ):
            log.info(line)

    # -- checkpoints -------------------------------------------------------------------------
    def _restore(self) -> tuple[int, int]:
        """(start step, tokens seen) from the newest valid checkpoint, or (0, 0)."""
        acc = self.accelerator
        if acc.is_main_process:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            clear_temps(self.ckpt_root)
            if self.resume == "never":
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
                self.ckpt_root.mkdir(parents=True)
        acc.wait_for_everyone()
        found = latest_checkpoint(self.ckpt_root, self.fingerprint) if self.resume != "never" else None
        if found is None:
            return 0, 0
        path, state = found
        try:
            acc.load_state(str(path))
        except pickle.UnpicklingError as e:
            raise PipelineError(
                f"refused to load {path}: it holds more than plain tensors ({str(e).splitlines()[0][:120]}); "
                f"only weights_only state is loaded. Delete that checkpoint if you did not write it."
            ) from None
        log.info("resumed from %s (step %d)", path, state["step"])
        return state["step"], state["tokens_seen"]

    def save_checkpoint(self, step: int, tokens_seen: int, previous: Path | None) -> Path:
        acc = self.accelerator
        final = step_dir(self.ckpt_root, step)
        tmp = final.with_name(".tmp-" + final.name)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                state = {"step": step, "tokens_seen": tokens_seen, "fingerprint": self.fingerprint}
                write_checkpoint_state(tmp, final, state, self.spec.keep_checkpoints)
        except OSError as e:  # disk full, quota, permissions: keep what is already on disk
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise PipelineError(
                f"could not write checkpoint {final} ({e.strerror or e}); {kept}. Free disk space or fix "
                f"permissions under {self.ckpt_root}, then rerun to resume."
            ) from None
        acc.wait_for_everyone()
        return final

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss per token and bits per byte (text tokens only) over all ranks."""
        acc = self.accelerator
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # loss, tokens, text loss, bytes
        for batch in self.eval_data[self.rank :: self.world]:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                losses = token_losses(self.forward_model, batch).double()
            mask = batch["labels"] != IGNORE
            sums[0] += losses[mask].sum()
            sums[1] += mask.sum()
            if self.token_bytes is not None:
                nbytes = self.token_bytes[batch["labels"].clamp(min=0)] * mask
                sums[2] += losses[nbytes > 0].sum()
                sums[3] += nbytes.sum()
        sums = acc.reduce(sums, reduction="sum") if self.world > 1 else sums
        self.model.train()
        out = {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()}
        if self.token_bytes is not None:
            out["val_bpb"] = bits_per_byte(sums[2].item(), int(sums[3].item()))
        return out

    # -- training ----------------------------------------------------------------------------
    def _step_batches(self, step: int) -> tuple[list[dict], list[int]]:
        """This rank's micro-batches of global step `step`, on device, and [trained, input] token counts."""
        first = step * self.global_seqs + self.rank * self.micro * self.accum
        dev = self.accelerator.device
        pin = dev.type == "cuda"
        batches, counts = [], [0, 0]
        for m in range(self.accum):
            b = self.batch_fn(first + m * self.micro, self.micro)
            counts[0] += int((b["labels"] != IGNORE).sum())
            counts[1] += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            batches.append({k: (v.pin_memory() if pin else v).to(dev, non_blocking=pin) for k, v in b.items()})
        return batches, counts

    def _train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step; returns (mean loss per trained token, grad norm, input tokens of the step)."""
        acc = self.accelerator
        batches, counts = self._step_batches(step)
        counts = torch.tensor(counts, device=acc.device)
        total, tokens = (acc.reduce(counts, reduction="sum") if self.world > 1 else counts).tolist()
        if total == 0:
            raise PipelineError(f"step {step} has no trained tokens (every label is masked); check the data.")
        scale = self.world / total
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for m, batch in enumerate(batches):
            sync = m == self.accum - 1
            ctx = acc.no_sync(self.model) if not sync else nullcontext()
            with ctx, acc.autocast():
                losses = token_losses(self.forward_model, batch)
                micro_sum = losses.sum()
                acc.backward(micro_sum * scale)
            loss_sum += micro_sum.detach().double()
        grad_norm = (
            acc.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
            if self.spec.grad_clip > 0 else torch.zeros(())
        )
        loss_sum = acc.reduce(loss_sum, reduction="sum") if self.world > 1 else loss_sum
        loss = loss_sum / total
        if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)  # never apply a NaN/inf update
            return loss, grad_norm, tokens
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.spec)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, tokens

    def fit(self, flops_per_token: float | None = None, metrics_name: str = "metrics.jsonl") -> dict:
        spec, acc = self.spec, self.accelerator
        self.preflight(flops_per_token)
        start, tokens_seen = self._restore()
        start_tokens = tokens_seen
        metrics = MetricsFile(self.out_dir / metrics_name, acc.is_main_process, start if start else None)
        self.metrics = metrics
        last_ckpt = step_dir(self.ckpt_root, start) if start else None
        summary = {"start_step": start}
        if start == 0:
            first = self.evaluate()
            metrics.write({"step": 0, **first})
            log.info("step 0: val loss %.4f%s", first["val_loss"], _bpb(first))
        else:  # resumed: the step-0 evaluation is already in metrics.jsonl
            first = next((r for r in metrics.rows() if r.get("step") == 0 and "val_loss" in r), None)
        if first:
            summary["initial"] = {k: v for k, v in first.items() if k != "step"}
        skipped = 0
        bar = tqdm(total=spec.max_steps, initial=start, desc="train", disable=None if acc.is_main_process else True,
                   dynamic_ncols=True)
        t_last, tok_last, train_time = time.time(), tokens_seen, 0.0
        step = start
        with _StopSignal() as stop:
            while step < spec.max_steps:
                loss, grad_norm, step_tokens = self._train_step(step)
                step += 1
                tokens_seen += step_tokens
                loss_value = loss.item()
                if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                    what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {float(grad_norm)}"
                    if skipped < spec.skip_nonfinite:
                        skipped += 1
                        log.warning("step %d: %s; update skipped (%d of train.skip_nonfinite=%d)",
                                    step, what, skipped, spec.skip_nonfinite)
                    else:
                        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                        raise PipelineError(
                            f"the {what} at step {step} is not finite; {where}. Lower train.lr, raise "
                            f"train.warmup_steps, check the data or allow skips with train.skip_nonfinite=N, "
                            f"then rerun (resume=auto continues from the checkpoint)."
                        )
                bar.update(1)
                if step % spec.log_every == 0 or step == spec.max_steps:
                    now = time.time()
                    dt = now - t_last
                    train_time += dt
                    tps = (tokens_seen - tok_last) / max(dt, 1e-9)
                    row = {"step": step, "loss": loss_value, "lr": lr_at(step - 1, spec),
                           "grad_norm": float(grad_norm), "tokens_per_s": tps, "tokens_seen": tokens_seen,
                           "peak_mem_gb": peak_memory_gb(acc.device)}
                    if self.peak and flops_per_token:
                        row["mfu"] = flops_per_token * tps / (self.peak * self.world)
                    metrics.write(row)
                    if acc.trackers:
                        acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}")
                    t_last, tok_last = time.time(), tokens_seen
                if (spec.eval_every and step % spec.eval_every == 0) or step == spec.max_steps:
                    ev = self.evaluate()
                    metrics.write({"step": step, **ev})
                    if acc.trackers:
                        acc.log(ev, step=step)
                    log.info("step %d: train loss %.4f, val loss %.4f%s", step, loss_value, ev["val_loss"], _bpb(ev))
                    summary["final"] = ev
                    t_last = time.time()  # evaluation time is not training time
                stopping = self._should_stop(stop)
                if (spec.ckpt_every and step % spec.ckpt_every == 0) or step == spec.max_steps or stopping:
                    last_ckpt = self.save_checkpoint(step, tokens_seen, last_ckpt)
                    t_last = time.time()
                if stopping:
                    bar.close()
                    raise TrainingStopped(step, last_ckpt)
        bar.close()
        if "final" not in summary:  # resumed at the last step: nothing left to train, still report
            summary["final"] = self.evaluate()
        if acc.trackers:
            acc.end_training()
        summary.update(steps=step, tokens_seen=tokens_seen, train_seconds=round(train_time, 1),
                       tokens_per_s=round((tokens_seen - start_tokens) / max(train_time, 1e-9), 1),
                       last_checkpoint=str(last_ckpt) if last_ckpt else None)
        return summary

    def _should_stop(self, stop: _StopSignal) -> bool:
        if self.world == 1:
            return stop.signum is not None
        flag = torch.tensor(1 if stop.signum is not None else 0, device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())


def _bpb(ev: dict) -> str:
    return f", val bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
