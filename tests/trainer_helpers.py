"""In-process building blocks for training tests: synthetic shards, a tiny model, a Trainer."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from accelerate.state import AcceleratorState, PartialState

import pipeline
from pipeline.config.model import ModelSpec
from pipeline.config.train import TrainSpec
from pipeline.data.shards import TokenShards
from pipeline.data.windows import PackedWindows
from pipeline.model.build import build_model, hf_config
from pipeline.train import checkpoints
from pipeline.train.choices import prepare_launch
from pipeline.train.loop import Trainer, TrainingJob

VOCAB = 64


def synthetic_shards(n_tokens: int = 20_000, seed: int = 0) -> TokenShards:
    """Tokens with learnable structure: a noisy repeating ramp."""
    rng = np.random.default_rng(seed)
    base = np.arange(n_tokens) % 17 + 3
    noise = rng.integers(0, VOCAB, n_tokens)
    tokens = np.where(rng.random(n_tokens) < 0.2, noise, base).astype(np.uint16)
    return TokenShards([tokens[: n_tokens // 2], tokens[n_tokens // 2 :]])


def tiny_model(seed: int = 0):
    spec = ModelSpec(d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=64)
    return build_model(hf_config(spec, VOCAB, 0, 1, 2), seed)


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def make_trainer(out, batch_fn=None, seed: int = 0, allocator=None, **spec_overrides) -> Trainer:
    reset_accelerate()
    spec = TrainSpec(
        **{
            "max_steps": 8,
            "batch_tokens": 256,
            "micro_batch_size": 4,
            "seq_len": 32,
            "lr": 3e-3,
            "warmup_steps": 2,
            "mixed_precision": "no",
            "log_every": 1,
            "eval_every": 4,
            "eval_tokens": 256,
            "ckpt_every": 4,
            **spec_overrides,
        }
    )
    windows = PackedWindows(synthetic_shards(), spec.seq_len, seed)
    val = torch.from_numpy(
        np.stack([synthetic_shards(3000, 1).arrays[0][i * 33 : i * 33 + 33] for i in range(8)]).astype(np.int64)
    )
    evals = [{"input_ids": val[:, :-1], "labels": val[:, 1:]}]
    job = TrainingJob(tiny_model(seed), spec, out, "test", batch_fn or windows.batch, lambda micro: evals)
    return Trainer(job, prepare_launch(job, allocator))


def restored_step(trainer: Trainer) -> int:
    """The step a fresh fit() of this trainer would resume from (loading that checkpoint)."""
    state = checkpoints.restore(trainer.strategy, trainer.ckpt_root, trainer.job.fingerprint, "auto")
    return state["step"] if state else 0


def losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.metrics.rows() if "loss" in r]


def weights(trainer: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def nan_at(trainer, steps):
    """Make the forward pass return NaN logits (and hidden states, which the loss may project
    itself) on the given (0-based) steps."""
    calls = {"n": 0}
    per_step = trainer.layout.accum

    def hook(module, inputs, output):
        if not module.training:  # evaluation passes do not count
            return output
        step = calls["n"] // per_step
        calls["n"] += 1
        if step in steps:
            output.logits = output.logits * float("nan")
            if output.hidden_states is not None:
                output.hidden_states = tuple(h if h is None else h * float("nan") for h in output.hidden_states)
        return output

    trainer.unwrapped_model.register_forward_hook(hook)


def host_reads(monkeypatch) -> list[str]:
    """A list that records every host read of a tensor's value (.item(), float(), bool() ...) made
    from pipeline's own code from now on: each would stall a GPU's queue inside a step."""
    package, reads = os.path.dirname(pipeline.__file__), []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):

        def spy(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):  # noqa: B008 (bound now)
            if sys._getframe(1).f_code.co_filename.startswith(package):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def autograd_saved_bytes(model, fn) -> int:
    """Bytes of the distinct storages, parameters aside, that autograd saves for backward while fn runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
