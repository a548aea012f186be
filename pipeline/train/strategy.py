"""Everything that depends on how the run was launched, in one place.

`accelerate launch` picks the strategy (one device, DDP, FSDP, DeepSpeed) and the process count;
the Strategy owns the Accelerator and answers the loop's questions: the batch layout (with
micro_batch_size=auto), precision, how a micro-step syncs and backpropagates, the gradient norm,
cross-rank sums, saving and loading state, and the consolidated weights. The loop holds no
strategy branches: a launch-specific case lives here.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pipeline.config.train import TrainSpec
from pipeline.device import (
    accumulator_dtype,
    best_device,
    half_precision,
    has_accelerator,
)
from pipeline.errors import PipelineError, first_line
from pipeline.train.layout import BatchLayout, batch_layout
from pipeline.train.loss import token_losses
from pipeline.train.optim import make_optimizer
from pipeline.train.preflight import activation_bytes, divisors_desc, find_micro_batch

log = logging.getLogger("pipeline")


def resolve_mixed_precision(choice: str) -> str:
    """An explicit choice is obeyed; "auto" is bf16 (fp16 before Ampere) on a CUDA GPU, fp32 elsewhere."""
    if choice != "auto":
        return choice
    device = best_device()
    return (half_precision(device) if device.type == "cuda" else None) or "no"


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch to the device; on CUDA from pinned memory without blocking, so the copy
    overlaps the GPU's work instead of waiting for it."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


class CompiledOrEager:
    """torch.compile a function; if compiling fails (no C++ compiler, an unsupported op), say so
    once and run it eagerly rather than losing the run."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # inductor/dynamo raise many types
                log.warning("torch.compile failed (%s: %s); continuing without compilation", type(e).__name__,
                            first_line(e) if str(e).strip() else "")
                self.compiled = None
        return self.fn(*args, **kwargs)


class Strategy:
    def __init__(self, spec: TrainSpec, out_dir: Path, trackers: tuple[str, ...] = (), precision: str | None = None):
        """`precision` is the mixed precision already chosen (e.g. measured); None resolves spec's."""
        self.spec = spec
        self.accelerator = acc = Accelerator(
            cpu=not has_accelerator(),
            mixed_precision=precision or resolve_mixed_precision(spec.mixed_precision),
            log_with=list(trackers) or None,
            project_dir=str(out_dir),
        )
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.acc_dtype = accumulator_dtype(self.device)  # of loss sums and token counts
        self.is_main = acc.is_main_process
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.sharded = self.deepspeed or acc.distributed_type == DistributedType.FSDP
        # Sharded parameters are gathered only inside the model's forward, so the chunked loss,
        # which calls the output embedding outside it, is off there.
        self.loss_chunk_tokens = 0 if self.sharded else spec.loss_chunk_tokens
        self.layout: BatchLayout | None = None
        self.model = None  # the prepared model
        # The training loss, model and cross entropy compiled as one graph (train.compile), else None.
        # Compiling the model alone left the loss's casts and softmax eager and gained little.
        self.compiled_losses: CompiledOrEager | None = None
        self.warnings: list[str] = []  # launch-specific caveats, also written to the manifest
        if self.deepspeed and spec.skip_nonfinite:
            raise PipelineError(
                "train.skip_nonfinite needs the loss before the optimizer steps, but DeepSpeed steps inside "
                "backward(); set train.skip_nonfinite=0 or launch with a DDP/FSDP config."
            )
        if self.world > 1:  # every rank reports in: after a hang, the missing line names the culprit
            print(f"[pipeline] rank {self.rank}/{self.world} ready on {self.device} (pid {os.getpid()}, "
                  f"host {socket.gethostname()})", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return str(self.accelerator.distributed_type).split(".")[-1]

    @property
    def scales_loss(self) -> bool:
        """fp16 with dynamic loss scaling (torch's GradScaler, or DeepSpeed's own): a step whose
        gradients overflow is skipped by the scaler, which lowers its scale."""
        fp16_deepspeed = self.deepspeed and self.precision == "fp16"
        return getattr(self.accelerator, "scaler", None) is not None or fp16_deepspeed

    def optimizer_step(self, optimizer) -> torch.Tensor:
        """Step; returns 1.0 (device tensor) if loss scaling skipped the update for an overflow. The
        scale is compared on the device: a fused optimizer skips inside its kernel, which accelerate's
        step_was_skipped does not see, and reading the scale would wait for the GPU."""
        scaler = getattr(self.accelerator, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        before = scale.clone() if scale is not None else None
        optimizer.step()
        if before is not None:
            return (scaler._scale < before).to(self.acc_dtype).reshape(())
        skipped = self.deepspeed and bool(getattr(optimizer, "step_was_skipped", False))  # DeepSpeed syncs anyway
        return torch.tensor(float(skipped), dtype=self.acc_dtype, device=self.device)

    @property
    def precision(self) -> str:
        return self.accelerator.mixed_precision

    def describe(self) -> dict:
        """The facts of this launch, for the manifest."""
        compiled = self.compiled_losses is not None and self.compiled_losses.compiled is not None
        return {"processes": self.world, "micro_batch": self.layout.micro, "accumulation": self.layout.accum,
                "mixed_precision": self.precision, "strategy": self.name, "compiled": compiled,
                "device": str(self.device), "warnings": self.warnings}

    # -- setup ---------------------------------------------------------------------------------
    def losses(self, batch: dict, train: bool = True) -> torch.Tensor:
        """Per-token losses of the prepared model; compiled in training where chosen. Evaluation
        stays eager: its no-grad graph would be a second compilation for a few passes."""
        fn = self.compiled_losses if train and self.compiled_losses is not None else token_losses
        return fn(self.model, batch, self.loss_chunk_tokens)

    def setup(self, model):
        """(prepared model, optimizer); fixes self.layout for this launch."""
        spec = self.spec
        if spec.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        micro = self._auto_micro_batch(model) if spec.micro_batch_size == "auto" else None
        self.layout = batch_layout(spec, self.world, micro)
        if self.deepspeed:  # DeepSpeed owns micro-batch, accumulation and clipping: give it this run's
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config.update(train_micro_batch_size_per_gpu=self.layout.micro,
                          gradient_accumulation_steps=self.layout.accum, gradient_clipping=spec.grad_clip)
            self.accelerator.gradient_accumulation_steps = self.layout.accum
        optimizer = make_optimizer(model, spec, self.device.type == "cuda", self.sharded)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self._check_adapter_survived(model)
        self._warn_zero3_tied_lora(model)
        self.model = model
        if spec.compile is True:  # "auto" is measured by the Trainer
            self.compiled_losses = CompiledOrEager(token_losses)
        return model, optimizer

    def _auto_micro_batch(self, model) -> int:
        """Largest micro-batch that fits, agreed by all ranks (the minimum). GPUs probe a real
        forward+backward with OOM back-off; CPUs cap it at a quarter of free RAM (an OOM there
        kills the process instead of raising)."""
        spec, acc = self.spec, self.accelerator
        per_rank = batch_layout(spec, self.world, micro_batch=1).global_seqs // self.world  # validates first
        cfg = model.config
        half = self.precision in ("bf16", "fp16")

        def act(size):
            return activation_bytes(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, size * spec.seq_len,
                                    half, spec.activation_checkpointing)

        cap = None
        if self.device.type == "cpu":
            free = psutil.virtual_memory().available
            cap = max([d for d in divisors_desc(per_rank) if act(d) <= free / 4] or [1])
        if not getattr(model, "hf_device_map", None):  # a quantized base is placed when loaded
            model.to(self.device)
        gen = torch.Generator().manual_seed(0)

        def probe(size):
            ids = torch.randint(0, cfg.vocab_size, (size, spec.seq_len + 1), generator=gen).to(self.device)
            with acc.autocast():
                batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
                loss = token_losses(model, batch, self.loss_chunk_tokens).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        size = torch.tensor(find_micro_batch(per_rank, probe, cap), device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN)
        log.info("micro_batch_size=auto: %d sequences per device fit", int(size))
        return int(size)

    def _check_adapter_survived(self, model) -> None:
        """PEFT must find the LoRA weights in the prepared model's state dict, or the saved adapter
        would be empty (accelerate's FSDP activation checkpointing renames modules)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "peft_config"):
            return
        from peft import get_peft_model_state_dict

        if not get_peft_model_state_dict(unwrapped):
            raise PipelineError(
                "PEFT finds no LoRA weights in the prepared model, so the adapter would be saved empty; with FSDP, "
                "set fsdp_activation_checkpointing: false in the accelerate config and use "
                "train.activation_checkpointing=true instead."
            )

    def _warn_zero3_tied_lora(self, model) -> None:
        plugin = self.accelerator.state.deepspeed_plugin if self.deepspeed else None
        unwrapped = self.accelerator.unwrap_model(model)
        frozen = any(not p.requires_grad for p in unwrapped.parameters())
        if plugin and plugin.zero_stage == 3 and frozen and getattr(unwrapped.config, "tie_word_embeddings", False):
            self.warnings.append("DeepSpeed ZeRO-3 with LoRA on a model with tied embeddings: gradients differ from a "
                                 "1-process run (DeepSpeed's handling of the frozen tied weight); prefer ZeRO-2 or "
                                 "FSDP for LoRA.")
            log.warning(self.warnings[-1])

    # -- one step ------------------------------------------------------------------------------
    @contextmanager
    def micro_step(self, model, last: bool):
        """Forward+backward of one micro-batch: gradients are synchronised only on the last one
        (DeepSpeed's engine decides that itself, and steps at the boundary)."""
        self.accelerator.sync_gradients = last
        sync = nullcontext() if last or self.deepspeed else self.accelerator.no_sync(model)
        with ExitStack() as stack:
            stack.enter_context(sync)
            stack.enter_context(self.accelerator.autocast())
            yield

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps; undo it, the loss is already normalised.
        self.accelerator.backward(loss * (self.layout.accum if self.deepspeed else 1))

    def clip_grad_norm(self, model) -> torch.Tensor:
        """Clip to spec.grad_clip (0 = off) and return the norm as a device tensor (acc_dtype)."""
        clip = self.spec.grad_clip
        norm = self.accelerator.clip_grad_norm_(model.parameters(), clip) if clip > 0 else 0.0
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return torch.as_tensor(float("nan") if norm is None else norm, device=self.device).to(self.acc_dtype)

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.world > 1 else tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on one (e.g. a stop signal reached one process)."""
        if self.world == 1:
            return flag
        return bool(self.sum_over_ranks(torch.tensor(int(flag), device=self.device)).item())

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def synchronize(self) -> None:
        """Wait for the device's queued work, so wall-clock time measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def from_main(self, value: int) -> int:
        """The main process's value on every rank (for decisions made from timings, which differ)."""
        if self.world == 1:
            return value
        tensor = torch.tensor(value, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor.item())

    # -- state ---------------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Every rank writes its part (shards under FSDP/DeepSpeed) of model, optimizer and RNG."""
        self.accelerator.save_state(str(path))

    def load_state(self, path: Path) -> None:
        try:
            self.accelerator.load_state(str(path))
        except pickle.UnpicklingError as e:
            raise PipelineError(
                f"refused to load {path}: it holds more than plain tensors ({first_line(e, 120)}); "
                f"only weights_only state is loaded. Delete that checkpoint if you did not write it."
            ) from None

    def consolidated_state_dict(self, model) -> dict:
        """The full model state dict on the main process (FSDP and ZeRO-3 shards gathered); every
        rank must call it. Afterwards transformers no longer treats new models as ZeRO-3 partitioned:
        from_pretrained would partition a model loaded on one rank, and generate would wait for the
        other ranks."""
        state_dict = self.accelerator.get_state_dict(model)
        if self.deepspeed:
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        return state_dict
