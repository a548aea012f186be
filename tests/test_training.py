import math
import os
import signal

import numpy as np
import pytest
import torch

from pipeline.config.train import TrainSpec
from pipeline.data.windows import PackedWindows, eval_windows
from pipeline.errors import PipelineError, TrainingStopped
from pipeline.model.build import count_params, flops_per_token
from pipeline.train.bpb import token_byte_strings
from pipeline.train.layout import batch_layout
from pipeline.train.optim import lr_at, make_optimizer
from pipeline.train.strategy import Strategy
from tests.trainer_helpers import (
    host_reads,
    losses,
    make_trainer,
    nan_at,
    reset_accelerate,
    restored_step,
    synthetic_shards,
    tiny_model,
    weights,
)


def test_lr_schedule_warmup_then_cosine_to_floor():
    spec = TrainSpec(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, spec) == pytest.approx(0.1) and lr_at(9, spec) == pytest.approx(1.0)
    assert lr_at(55, spec) == pytest.approx(0.55)
    assert lr_at(100, spec) == pytest.approx(0.1)
    lin = TrainSpec(max_steps=100, warmup_steps=0, lr=1.0, min_lr_ratio=0.0, decay="linear")
    assert lr_at(50, lin) == pytest.approx(0.5)


def test_batch_layout_keeps_global_batch_fixed():
    spec = TrainSpec(batch_tokens=64 * 256, seq_len=256, micro_batch_size=8)
    assert batch_layout(spec, 1) == (64, 8, 8)
    assert batch_layout(spec, 4) == (64, 8, 2)
    with pytest.raises(PipelineError, match="does not split over 3 processes"):
        batch_layout(spec, 3)
    with pytest.raises(PipelineError, match="not a multiple of train.seq_len"):
        batch_layout(TrainSpec(batch_tokens=1000, seq_len=256), 1)


@pytest.mark.parametrize("field, value", [("lr", -1.0), ("micro_batch_size", 0), ("max_steps", 0), ("decay", "step")])
def test_invalid_train_values_are_refused(field, value):
    with pytest.raises(PipelineError, match=f"train.{field}"):
        TrainSpec(**{field: value})


def test_no_weight_decay_on_norms_and_embeddings():
    model = tiny_model()
    opt = make_optimizer(model, TrainSpec(weight_decay=0.1), fused=False)
    decayed, plain = opt.param_groups
    emb = model.get_input_embeddings().weight
    assert all(p.dim() >= 2 for p in decayed["params"]) and not any(p is emb for p in decayed["params"])
    assert any(p is emb for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == count_params(model)


def test_fused_adamw_of_the_cuda_path_takes_the_same_steps():
    ids = torch.arange(64).remainder(60).view(2, 32)
    trained = []
    for fused in (False, True):
        model = tiny_model()
        opt = make_optimizer(model, TrainSpec(lr=1e-2), fused=fused)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        trained.append(model.state_dict())
    for k, v in trained[0].items():
        torch.testing.assert_close(trained[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_flops_per_token_counts_matmul_params_and_attention():
    model = tiny_model()
    n = count_params(model)  # tied embeddings: the head matmul uses them
    assert flops_per_token(model, 64) == 6 * n + 12 * 2 * 32 * 64


def test_windows_are_deterministic_and_cover_an_epoch():
    w = PackedWindows(synthetic_shards(), 32, seed=3)
    first = [w.window(i).tolist() for i in range(w.num_windows)]
    assert first == [PackedWindows(synthetic_shards(), 32, seed=3).window(i).tolist() for i in range(w.num_windows)]
    assert len({tuple(x) for x in first}) == w.num_windows  # each window once per epoch
    assert [w.window(w.num_windows + i).tolist() for i in range(5)] != first[:5]  # a new order next epoch
    b = w.batch(0, 4)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])


def test_too_little_data_for_one_window_is_refused():
    with pytest.raises(PipelineError, match="fewer than one window"):
        PackedWindows(synthetic_shards(20), 32, seed=0)
    with pytest.raises(PipelineError, match="validation split"):
        eval_windows(synthetic_shards(20), 32, 1000)


def test_token_bytes_reassemble_the_text(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.model.tokenizer import to_hf_tokenizer, train_bpe
    from tests.conftest import make_documents

    to_hf_tokenizer(train_bpe(make_documents(40), 300), 128).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    pieces = token_byte_strings(tok)
    text = "naïve 日本 🎉 code\n\tx = 1<|eos|>"
    assert b"".join(pieces[i] for i in tok.encode(text)) == text.replace("<|eos|>", "").encode()


def test_loss_goes_down(tmp_path):
    t = make_trainer(tmp_path, max_steps=30, eval_every=30, ckpt_every=0)
    summary = t.fit()
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"] - 0.5


def test_gradient_accumulation_equals_large_batch(tmp_path):
    big = make_trainer(tmp_path / "big", micro_batch_size=8)
    assert big.layout.accum == 1
    big.fit()
    acc = make_trainer(tmp_path / "acc", micro_batch_size=2)
    assert acc.layout.accum == 4
    acc.fit()
    np.testing.assert_allclose(losses(big), losses(acc), rtol=1e-5, atol=1e-6)
    for k, v in weights(big).items():
        torch.testing.assert_close(v, weights(acc)[k], rtol=1e-4, atol=1e-5)


def test_exact_resume_after_stop(tmp_path):
    ref = make_trainer(tmp_path / "ref")
    ref.fit()
    assert len(losses(ref)) == 8

    stop_at = 3  # deliver SIGTERM while step 3 loads its data; the run stops after step 3
    t = make_trainer(tmp_path / "run")
    real_batch = t.job.train_batch

    def batch_then_signal(first, size):
        if first == (stop_at - 1) * t.layout.global_seqs:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(first, size)

    t.job.train_batch = batch_then_signal
    with pytest.raises(TrainingStopped) as stopped:
        t.fit()
    assert stopped.value.step == stop_at and (tmp_path / "run/checkpoints/step_000003").is_dir()

    resumed = make_trainer(tmp_path / "run")
    summary = resumed.fit()
    assert summary["start_step"] == stop_at
    np.testing.assert_allclose(losses(resumed), losses(ref), rtol=0, atol=1e-6)
    for k, v in weights(ref).items():
        torch.testing.assert_close(v, weights(resumed)[k], rtol=0, atol=1e-6)


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    t = make_trainer(tmp_path)
    t.fit()
    newest = tmp_path / "checkpoints" / "step_000008" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    again = make_trainer(tmp_path)
    assert restored_step(again) == 4
    assert "damaged" in caplog.text


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    t = make_trainer(tmp_path, lr=1e30, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(PipelineError, match=r"the (loss|gradient norm) (nan|inf) at step \d+ is not finite"):
        t.fit()


def test_a_nan_found_at_a_later_read_names_its_step_and_is_never_checkpointed(tmp_path):
    t = make_trainer(tmp_path, log_every=4, eval_every=0, ckpt_every=4)  # values read at steps 4 and 8
    nan_at(t, {5})
    with pytest.raises(
        PipelineError, match=r"loss nan at step 6 is not finite; the last good checkpoint is .*step_000004"
    ):
        t.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


def test_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """A host read of a device value (.item(), float(), bool() ...) stalls a GPU's queue; the
    pipeline's code makes none inside a step, only when it reads the steps back."""
    t = make_trainer(tmp_path, micro_batch_size=2)  # with accumulation
    reads = host_reads(monkeypatch)
    pending = [t.step(0), t.step(1)]
    assert reads == []
    loss, grad_norm, tokens, _ = t.read_back(pending, 2, None)
    assert reads and math.isfinite(loss) and grad_norm > 0 and tokens == 2 * 256


def test_a_second_training_in_one_process_may_choose_another_precision(tmp_path):
    """stage=all pretrains in bf16 (measured) and may fine-tune in fp32 (a run too short to
    measure): accelerate's per-process state must not refuse the second launch."""
    reset_accelerate()
    assert Strategy(TrainSpec(mixed_precision="bf16"), tmp_path).precision == "bf16"
    assert Strategy(TrainSpec(mixed_precision="no"), tmp_path).precision == "no"


def test_a_sharded_launch_refuses_a_second_precision_in_one_line(tmp_path):
    """FSDP and DeepSpeed keep their plugins in accelerate's state: resetting it would fail deep
    inside accelerate, so a change of precision between stages is refused with the fix."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    reset_accelerate()
    Strategy(TrainSpec(mixed_precision="bf16"), tmp_path)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as an FSDP launch sets it
    with pytest.raises(PipelineError, match="finetune.train.mixed_precision to the same value"):
        Strategy(TrainSpec(mixed_precision="no"), tmp_path)
    reset_accelerate()
