"""Everything that depends on how the run was launched, in one place.

`accelerate launch` picks the strategy (one device, DDP, FSDP, DeepSpeed) and the process count;
the Strategy owns the Accelerator and answers the loop's questions: the batch layout, precision
and autocast, how a micro-step syncs and backpropagates, the gradient norm, cross-rank sums and
broadcasts, trackers, saving and loading state, and the consolidated weights. The loop reaches
accelerate only through it, and holds no strategy branches.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, broadcast_object_list

from pipeline.config.train import TrainSpec
from pipeline.device import accumulator_dtype, has_accelerator, resolve_mixed_precision
from pipeline.errors import PipelineError, first_line
from pipeline.train.layout import BatchLayout, batch_layout
from pipeline.train.optim import make_optimizer

log = logging.getLogger("pipeline")


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch to the device; on CUDA from pinned memory without blocking, so the copy
    overlaps the GPU's work instead of waiting for it."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


class ProcessInfo(NamedTuple):
    device: torch.device
    world: int  # processes in the launch
    rank: int


def process_info() -> ProcessInfo:
    """This process's device and place in the launch, before any Strategy exists."""
    state = PartialState()
    return ProcessInfo(state.device, state.num_processes, state.process_index)


def broadcast_from_main(value):
    """The main process's value (any picklable object) on every rank: decisions made from timings,
    which differ between ranks, must be the same everywhere."""
    if PartialState().num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def _reset_precision(precision: str) -> None:
    """One process may run several trainings (pretrain, then finetune) that choose different
    precisions; accelerate's per-process state refuses a change, so it starts afresh. FSDP and
    DeepSpeed keep their plugins in that state (and DeepSpeed its precision in its config file):
    there a change is refused in one line instead."""
    state = AcceleratorState()
    if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        kind = str(state.distributed_type).split(".")[-1]
        raise PipelineError(
            f"this {kind} launch already trained in {state.mixed_precision} and the next stage asks for "
            f"{precision}; set train.mixed_precision and finetune.train.mixed_precision to the same value, "
            "or run the stages in separate launches."
        )
    AcceleratorState._reset_state()


class Strategy:
    def __init__(self, spec: TrainSpec, out_dir: Path, trackers: tuple[str, ...] = (), precision: str | None = None):
        """`precision` is the mixed precision already chosen (e.g. measured); None resolves spec's."""
        self.spec = spec
        precision = precision or resolve_mixed_precision(spec.mixed_precision)
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
            _reset_precision(precision)
        self.accelerator = acc = Accelerator(
            cpu=not has_accelerator(),
            mixed_precision=precision,
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
        self.trained_only = False  # checkpoints hold only the trained weights (set by setup)
        self.trained_names: set[str] = set()
        self.warnings: list[str] = []  # launch-specific caveats, also written to the manifest
        if self.deepspeed and spec.skip_nonfinite:
            raise PipelineError(
                "train.skip_nonfinite needs the loss before the optimizer steps, but DeepSpeed steps inside "
                "backward(); set train.skip_nonfinite=0 or launch with a DDP/FSDP config."
            )
        if self.world > 1:  # every rank reports in: after a hang, the missing line names the culprit
            print(
                f"[pipeline] rank {self.rank}/{self.world} ready on {self.device} (pid {os.getpid()}, "
                f"host {socket.gethostname()})",
                file=sys.stderr,
                flush=True,
            )

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

    def describe(self, compiled: bool) -> dict:
        """The facts of this launch (and whether training's loss runs compiled), for the manifest."""
        return {
            "processes": self.world,
            "micro_batch": self.layout.micro,
            "accumulation": self.layout.accum,
            "mixed_precision": self.precision,
            "strategy": self.name,
            "compiled": compiled,
            "device": str(self.device),
            "warnings": self.warnings,
        }

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, model, micro_batch: int | None = None, muon_dtype: torch.dtype = torch.bfloat16):
        """(prepared model, optimizer); fixes self.layout for this launch (`micro_batch`: the size
        micro_batch_size=auto measured; `muon_dtype`: of Muon's Newton-Schulz iterations)."""
        spec = self.spec
        self.layout = batch_layout(spec, self.world, micro_batch)
        if self.deepspeed:  # DeepSpeed owns micro-batch, accumulation and clipping: give it this run's
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config.update(
                train_micro_batch_size_per_gpu=self.layout.micro,
                gradient_accumulation_steps=self.layout.accum,
                gradient_clipping=spec.grad_clip,
            )
            self.accelerator.gradient_accumulation_steps = self.layout.accum
        optimizer = make_optimizer(model, spec, self.device.type == "cuda", self.sharded, muon_dtype)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self._save_trained_only(model)
        self._check_adapter_survived(model)
        self._warn_zero3_tied_lora(model)
        return model, optimizer

    def _save_trained_only(self, model) -> None:
        """Checkpoints of a partly frozen model (LoRA) hold what is trained, not the frozen base it
        was loaded from: an 8B LoRA run would otherwise write 16 GB at every checkpoint. DeepSpeed
        leaves its frozen parameters out itself; FSDP's sharded save keeps them all."""
        frozen = any(not p.requires_grad for p in model.parameters())
        self.trained_only = frozen and self.accelerator.distributed_type != DistributedType.FSDP
        if self.trained_only and not self.deepspeed:
            unwrapped = self.accelerator.unwrap_model(model)  # DDP's state dict has its module's names
            self.trained_names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}

            def keep_trained(models, weights, output_dir):
                weights[:] = [{k: v for k, v in w.items() if k in self.trained_names} for w in weights]

            self.accelerator.register_save_state_pre_hook(keep_trained)

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
            self.warnings.append(
                "DeepSpeed ZeRO-3 with LoRA on a model with tied embeddings: gradients differ from a "
                "1-process run (DeepSpeed's handling of the frozen tied weight); prefer ZeRO-2 or "
                "FSDP for LoRA."
            )
            log.warning(self.warnings[-1])

    def unwrap(self, model) -> torch.nn.Module:
        """The model without the launch's wrappers (DDP, FSDP, DeepSpeed, compile)."""
        return self.accelerator.unwrap_model(model)

    # -- one step ------------------------------------------------------------------------------
    def autocast(self):
        """The launch's mixed-precision context for forward passes (a no-op in fp32)."""
        return self.accelerator.autocast()

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

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (e.g. the micro-batch that fits everywhere)."""
        if self.world == 1:
            return value
        tensor = torch.tensor(value, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return int(tensor.item())

    broadcast = staticmethod(broadcast_from_main)

    # -- trackers (wandb, tensorboard) ---------------------------------------------------------
    def init_trackers(self, project: str, config: dict) -> None:
        if self.accelerator.log_with:
            self.accelerator.init_trackers(project, config=config)

    def log_to_trackers(self, row: dict, step: int) -> None:
        if self.accelerator.trackers:
            self.accelerator.log(row, step=step)

    def end_trackers(self) -> None:
        if self.accelerator.trackers:
            self.accelerator.end_training()

    # -- state ---------------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Every rank writes its part (shards under FSDP/DeepSpeed) of model, optimizer and RNG; of a
        partly frozen model, only the trained weights."""
        trained_only = {"exclude_frozen_parameters": True} if self.deepspeed and self.trained_only else {}
        self.accelerator.save_state(str(path), **trained_only)

    def load_state(self, path: Path) -> None:
        """Load a checkpoint of this run; a partly frozen model keeps the frozen weights it has."""
        partial = ({"load_module_strict": False} if self.deepspeed else {"strict": False}) if self.trained_only else {}
        try:
            self.accelerator.load_state(str(path), **partial)
        except pickle.UnpicklingError as e:
            raise PipelineError(
                f"refused to load {path}: it holds more than plain tensors ({first_line(e, 120)}); "
                f"only weights_only state is loaded. Delete that checkpoint if you did not write it."
            ) from None
        if partial and not self.deepspeed:
            self._check_trained_loaded(path)

    def _check_trained_loaded(self, path: Path) -> None:
        """A non-strict load must still have found every trained weight."""
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            missing = sorted(self.trained_names - set(f.keys()))
        if missing:
            raise PipelineError(
                f"checkpoint {path} lacks {len(missing)} trained weights of this model (first: {missing[0]}); "
                "it was written by another model: move it away, or rerun with resume=never."
            )

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
