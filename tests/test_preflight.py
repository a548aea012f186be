"""Pre-flight estimates, micro_batch_size=auto (including the GPU OOM back-off, with a fake OOM),
compile fallback and activation checkpointing: the GPU-only branches tested through their logic."""

import numpy as np
import pytest
import torch

from pipeline.config.train import TrainSpec
from pipeline.device import DTYPES, best_device, half_precision
from pipeline.errors import PipelineError
from pipeline.train.preflight import (
    activation_bytes,
    divisors_desc,
    find_micro_batch,
    memory_table,
    preflight_lines,
)
from pipeline.train.strategy import to_device
from tests.trainer_helpers import losses, make_trainer


def test_memory_table_shards_what_each_strategy_shards():
    p = 1_000_000
    t = memory_table(p, p, n_layer=10, world=4, act=0)
    assert t["ddp"] == 16 * p
    assert t["zero2"] == 4 * p + 12 * p / 4
    assert t["fsdp/zero3"] == 16 * p / 4 + 4 * p / 10
    lora = memory_table(p, p // 100, 10, 1, 0)
    assert lora["ddp"] < 4.2 * p  # frozen base: weights only, tiny grads and moments


def test_activation_checkpointing_and_half_precision_shrink_activations():
    full = activation_bytes(12, 768, 50304, 8 * 1024, half=False, checkpointing=False)
    half = activation_bytes(12, 768, 50304, 8 * 1024, half=True, checkpointing=False)
    ckpt = activation_bytes(12, 768, 50304, 8 * 1024, half=True, checkpointing=True)
    logits = 10 * 50304 * 8 * 1024  # at a 50k vocabulary the logits are the biggest single item
    assert ckpt < half < full
    assert (ckpt - logits) < (half - logits) / 5


def test_report_gives_time_only_with_a_known_peak():
    args = dict(
        params=124_000_000,
        trainable=124_000_000,
        flops_per_token=8.5e8,
        n_layer=12,
        d_model=768,
        vocab=50304,
        micro_tokens=16 * 1024,
        world=8,
        half=True,
        checkpointing=False,
        budget_tokens=2_600_000_000,
    )
    gpu = preflight_lines(**args, peak_flops=989e12)
    assert len(gpu) == 3 and "h at 40% MFU" in gpu[2]
    hours = float(gpu[2].split("~")[1].split(" h")[0])
    assert hours == pytest.approx(2.6e9 * 8.5e8 / (0.4 * 989e12 * 8) / 3600, rel=0.01)
    assert len(preflight_lines(**args, peak_flops=None)) == 2


def test_find_micro_batch_backs_off_on_oom():
    tried = []

    def probe(size):
        tried.append(size)
        if size > 6:
            raise torch.OutOfMemoryError("fake CUDA OOM")

    assert find_micro_batch(32, probe) == 4  # 32, 16, 8 fail; 4 is the largest divisor that fits
    assert tried == [32, 16, 8, 4]
    assert find_micro_batch(32, lambda s: None, cap=10) == 8
    with pytest.raises(torch.OutOfMemoryError, match="not even a micro-batch of 1"):
        find_micro_batch(4, lambda s: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    assert divisors_desc(12) == [12, 6, 4, 3, 2, 1]


def test_auto_micro_batch_keeps_the_global_batch_and_the_losses(tmp_path):
    fixed = make_trainer(tmp_path / "fixed", micro_batch_size=2)
    fixed.fit()
    auto = make_trainer(tmp_path / "auto", micro_batch_size="auto")
    assert auto.layout.micro * auto.layout.accum == 8 and auto.layout.micro == 8  # plenty of RAM for 8 tiny sequences
    auto.fit()
    np.testing.assert_allclose(losses(auto), losses(fixed), rtol=1e-5, atol=1e-6)


def test_micro_batch_size_must_be_positive_or_auto():
    with pytest.raises(PipelineError, match="positive number or auto"):
        TrainSpec(micro_batch_size="big")


def test_failed_compile_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    def broken_compile(model, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    t = make_trainer(tmp_path / "c", compile=True)
    assert t.fit()["launch"]["compiled"] is False  # fell back to eager
    assert "torch.compile failed (RuntimeError: inductor: no C++ compiler found)" in caplog.text
    ref = make_trainer(tmp_path / "ref")
    ref.fit()
    np.testing.assert_allclose(losses(t), losses(ref), rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = make_trainer(tmp_path / "p")
    plain.fit()
    ckpt = make_trainer(tmp_path / "c", activation_checkpointing=True)
    ckpt.fit()
    np.testing.assert_allclose(losses(ckpt), losses(plain), rtol=1e-5, atol=1e-6)


def test_gpu_peak_flops_and_precision_choice(monkeypatch):
    from pipeline.device import resolve_mixed_precision
    from pipeline.train.throughput import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0)) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-40GB")
    assert peak_flops(torch.device("cuda", 0)) == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda", 0)) is None  # unknown: MFU omitted, not guessed
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto") == "fp16"  # pre-Ampere GPUs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"
    assert (best_device(), DTYPES[half_precision(best_device())]) == (
        torch.device("cuda"),
        torch.bfloat16,
    )  # generation too


def test_gpu_batches_are_copied_from_pinned_memory_without_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: calls.append(non_blocking) or self)
    to_device({"input_ids": torch.zeros(2, 4)}, torch.device("cuda", 0))
    assert calls == ["pin", True]
    calls.clear()
    to_device({"input_ids": torch.zeros(2, 4)}, torch.device("cpu"))
    assert calls == [False]


def test_gpu_peak_memory_is_read_from_the_allocator(monkeypatch):
    from pipeline.train.memory import peak_memory_gb

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12.5e9)
    assert peak_memory_gb(torch.device("cuda", 0)) == 12.5
    assert 0 < peak_memory_gb(torch.device("cpu")) < 1000  # resident memory of this process


def test_mfu_uses_the_peak_of_the_precision_in_use(monkeypatch):
    from pipeline.train.throughput import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    gpu = torch.device("cuda", 0)
    assert peak_flops(gpu, "bf16") == peak_flops(gpu, "fp16") == 989e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops(gpu, "no") == 67e12  # plain fp32 matmuls
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops(gpu, "no") == 989e12 / 2  # TF32 tensor cores
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    assert peak_flops(gpu, "no") == 15.7e12  # no TF32 before Ampere
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA L40")
    assert peak_flops(gpu, "bf16") == 181e12  # not the L4


def test_frozen_weights_cost_4_flops_per_token_trained_ones_6():
    from pipeline.model.build import flops_per_token
    from tests.trainer_helpers import tiny_model

    model = tiny_model()
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * 32
    matmul = sum(p.numel() for p in model.parameters()) - (
        0 if cfg.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    )
    assert flops_per_token(model, 32) == 6 * matmul + attention
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.model.layers[0].mlp.down_proj.weight
    head.requires_grad_(True)
    assert flops_per_token(model, 32) == 4 * matmul + 2 * head.numel() + attention


def test_loss_sums_avoid_float64_on_apple_mps():
    from pipeline.device import accumulator_dtype

    assert accumulator_dtype(torch.device("mps")) == torch.float32  # MPS has no float64
    assert accumulator_dtype(torch.device("cpu")) == accumulator_dtype(torch.device("cuda")) == torch.float64
