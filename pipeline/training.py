"""The one training loop, shared by pretrain and finetune, on Accelerate.

The strategy (single device, DDP, FSDP, DeepSpeed) comes from `accelerate launch`, not from
here. The loop owns: batch derivation from a global batch in tokens, AdamW with warmup+decay,
gradient accumulation, clipping, logging (tokens/s, MFU, memory), validation loss and bits per
byte, checkpoints with exact resume, and stopping cleanly on SIGTERM/SIGINT or a NaN loss.
A step leaves its loss, grad norm and token counts on the device; they are read back (one host
sync) every log_every steps and before any evaluation or checkpoint.

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
from accelerate.utils import DistributedType
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


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch to the device; on CUDA from pinned memory without blocking, so the copy
    overlaps the GPU's work instead of waiting for it."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


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
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            self._configure_deepspeed()
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

    def _configure_deepspeed(self) -> None:
        """DeepSpeed owns the micro-batch, accumulation and clipping; give it this run's values."""
        if self.spec.skip_nonfinite:
            raise PipelineError(
                "train.skip_nonfinite needs the loss before the optimizer steps, but DeepSpeed steps inside "
                "backward(); set train.skip_nonfinite=0 or launch with a DDP/FSDP config."
            )
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config.update(train_micro_batch_size_per_gpu=self.micro, gradient_accumulation_steps=self.accum,
                      gradient_clipping=self.spec.grad_clip)
        self.accelerator.gradient_accumulation_steps = self.accum

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

    def consolidated_state_dict(self) -> dict:
        """The full model state dict on the main process (FSDP and ZeRO-3 shards gathered); every
        rank must call it. Afterwards transformers no longer treats new models as ZeRO-3 partitioned:
        from_pretrained would partition a model loaded on one rank, and generate would wait for the
        other ranks."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.deepspeed:
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        return state_dict

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
        n = len(self.eval_data)
        for index in range(self.rank, -(-n // self.world) * self.world, self.world):
            # Every rank runs the same number of forwards: a sharded model's forward is collective.
            batch = {k: v.to(acc.device) for k, v in self.eval_data[min(index, n - 1)].items()}
            with acc.autocast():
                losses = token_losses(self.forward_model, batch).double()
            if index >= n:
                continue  # a padding pass, only to keep the ranks in step
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
    def _step_batches(self, step: int) -> tuple[list[dict], torch.Tensor]:
        """This rank's micro-batches of global step `step`, on device, and their [trained, input]
        token counts as a device tensor (counted there, so nothing waits for the GPU)."""
        first = step * self.global_seqs + self.rank * self.micro * self.accum
        dev = self.accelerator.device
        batches, counts = [], torch.zeros(2, dtype=torch.int64, device=dev)
        for m in range(self.accum):
            b = to_device(self.batch_fn(first + m * self.micro, self.micro), dev)
            counts[0] += (b["labels"] != IGNORE).sum()
            counts[1] += b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
            batches.append(b)
        return batches, counts

    def _train_step(self, step: int) -> torch.Tensor:
        """One optimizer step. Returns [mean loss per trained token, grad norm, trained tokens, input
        tokens] as one device tensor: nothing here waits for the GPU (unless train.skip_nonfinite
        needs the loss before deciding to step)."""
        acc = self.accelerator
        batches, counts = self._step_batches(step)
        counts = acc.reduce(counts, reduction="sum") if self.world > 1 else counts
        total = counts[0].double()
        scale = (self.world / total.clamp(min=1)).float()
        for group in self.optimizer.param_groups:  # before backward: DeepSpeed steps inside it
            group["lr"] = lr_at(step, self.spec)
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for m, batch in enumerate(batches):
            sync = m == self.accum - 1
            acc.sync_gradients = sync  # DeepSpeed's engine steps at the boundary
            ctx = nullcontext() if sync or self.deepspeed else acc.no_sync(self.model)
            with ctx, acc.autocast():
                micro_sum = token_losses(self.forward_model, batch).sum()
                # DeepSpeed divides by its gradient_accumulation_steps; undo it, the scale already normalises
                acc.backward(micro_sum * scale * (self.accum if self.deepspeed else 1))
            loss_sum += micro_sum.detach().double()
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip) if self.spec.grad_clip > 0 else 0.0
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, device=acc.device).double()
        loss_sum = acc.reduce(loss_sum, reduction="sum") if self.world > 1 else loss_sum
        stats = torch.stack([loss_sum / total, grad_norm, total, counts[1].double()])
        if self.spec.skip_nonfinite and not torch.isfinite(stats[:2]).all():
            self.optimizer.zero_grad(set_to_none=True)  # skipping: never apply a NaN/inf update
            return stats
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

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
        self._skipped = 0
        bar = tqdm(total=spec.max_steps, initial=start, desc="train", disable=None if acc.is_main_process else True,
                   dynamic_ncols=True)
        t_last, tok_last, train_time = time.time(), tokens_seen, 0.0
        step, pending = start, []
        with _StopSignal() as stop:
            while step < spec.max_steps:
                pending.append(self._train_step(step))
                step += 1
                bar.update(1)
                logging_step = step % spec.log_every == 0 or step == spec.max_steps
                eval_step = (spec.eval_every and step % spec.eval_every == 0) or step == spec.max_steps
                ckpt_step = (spec.ckpt_every and step % spec.ckpt_every == 0) or step == spec.max_steps
                # Device values are read back (one host sync) only at these steps; every step is
                # still checked, and nothing is evaluated or checkpointed before it was.
                if not (logging_step or eval_step or ckpt_step or spec.skip_nonfinite or self._may_stop(stop)):
                    continue
                loss_value, grad_norm, step_tokens = self._read_back(pending, step, last_ckpt)
                tokens_seen += step_tokens
                pending = []
                if logging_step:
                    now = time.time()
                    dt = now - t_last
                    train_time += dt
                    tps = (tokens_seen - tok_last) / max(dt, 1e-9)
                    row = {"step": step, "loss": loss_value, "lr": lr_at(step - 1, spec), "grad_norm": grad_norm,
                           "tokens_per_s": tps, "tokens_seen": tokens_seen, "peak_mem_gb": peak_memory_gb(acc.device)}
                    if self.peak and flops_per_token:
                        row["mfu"] = flops_per_token * tps / (self.peak * self.world)
                    metrics.write(row)
                    if acc.trackers:
                        acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}")
                    t_last, tok_last = time.time(), tokens_seen
                if eval_step:
                    ev = self.evaluate()
                    metrics.write({"step": step, **ev})
                    if acc.trackers:
                        acc.log(ev, step=step)
                    log.info("step %d: train loss %.4f, val loss %.4f%s", step, loss_value, ev["val_loss"], _bpb(ev))
                    summary["final"] = ev
                    t_last = time.time()  # evaluation time is not training time
                stopping = self._should_stop(stop)
                if ckpt_step or stopping:
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

    def _may_stop(self, stop: _StopSignal) -> bool:
        """A signal arrived here (one process). With several, ranks agree at the next read step."""
        return self.world == 1 and stop.signum is not None

    def _should_stop(self, stop: _StopSignal) -> bool:
        if self.world == 1:
            return stop.signum is not None
        flag = torch.tensor(1 if stop.signum is not None else 0, device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def _read_back(self, pending: list[torch.Tensor], step: int, last_ckpt: Path | None) -> tuple[float, float, int]:
        """Read the steps since the last read in one host sync and check each of them, so a NaN is
        reported at the step it happened. Returns (last loss, last grad norm, input tokens)."""
        rows = torch.stack(pending).tolist()
        for s, (loss, grad_norm, trained, _) in enumerate(rows, start=step - len(rows) + 1):
            if trained == 0:
                raise PipelineError(f"step {s} has no trained tokens (every label is masked); check the data.")
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
        loss, grad_norm, _, _ = rows[-1]
        return loss, grad_norm, int(sum(r[3] for r in rows))


def _bpb(ev: dict) -> str:
    return f", val bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
