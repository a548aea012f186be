"""Faults while training: signals, kill -9 at bad moments, full disks, damaged or unsafe checkpoints,
non-finite losses, and two processes on one run."""

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from tests.conftest import (
    TINY,
    assert_clear_error,
    last_actions,
    manifest_facts,
    run_cli,
)
from tests.trainer_helpers import losses, make_trainer, nan_at, restored_step

pytestmark = pytest.mark.slow


def pretrain_args(corpus, name, *extra):
    return [
        "stage=pretrain",
        f"run.name={name}",
        "data=text",
        f"data.paths=[{corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        *extra,
    ]


def start_cli(args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout=120):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_exits_0_and_resumes(tmp_path, text_corpus, signum):
    args = pretrain_args(text_corpus, "s", "train.max_steps=400", "train.ckpt_every=0", "train.eval_every=0")
    run_cli(*pretrain_args(text_corpus, "s", "stage=prepare"), cwd=tmp_path)  # upstream first: faster start
    proc = start_cli(args, tmp_path)
    metrics = tmp_path / "runs/s/pretrain/metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Resume with: pipeline" in err and "checkpoint saved to" in err
    ckpts = list((tmp_path / "runs/s/pretrain/checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and not (tmp_path / "runs/s/pretrain/manifest.json").exists()
    stopped_at = int(ckpts[0].name.split("_")[1])
    run_cli(*args, "train.max_steps=400", cwd=tmp_path)
    facts = manifest_facts(tmp_path / "runs/s/pretrain")
    assert facts["resumed_from_step"] == stopped_at and facts["final_val_bpb"] > 0


KILL_IN_PUBLISH = """
import os, signal, sys
import pipeline.model.hf_dir as hf_dir
real = hf_dir.replace_dir
def die_while_publishing(tmp, final):
    if final.name == "model":
        os.kill(os.getpid(), signal.SIGKILL)  # model files written to the staging dir, not yet renamed
    real(tmp, final)
hf_dir.replace_dir = die_while_publishing
from pipeline.cli import main
main(sys.argv[1:])
"""


def test_kill_9_while_publishing_the_model_is_recovered(tmp_path, text_corpus):
    run_cli(*pretrain_args(text_corpus, "ref"), cwd=tmp_path)
    args = pretrain_args(text_corpus, "k")
    proc = subprocess.run([sys.executable, "-c", KILL_IN_PUBLISH, *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -9
    stage = tmp_path / "runs/k/pretrain"
    assert not (stage / "model").exists() and not (stage / "manifest.json").exists()
    finetune = ["stage=finetune", "finetune.train.max_steps=1", "finetune.data.max_examples=32"]
    run_cli(*finetune, *args[1:], cwd=tmp_path, check=False)  # a later stage does not trust it
    assert last_actions(tmp_path / "runs/k", 5)["pretrain"] == "built (incomplete)"
    got = load_file(stage / "model/model.safetensors")
    ref = load_file(tmp_path / "runs/ref/pretrain/model/model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    assert not list(stage.glob(".model.tmp-*"))


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path):
    t = make_trainer(tmp_path)
    real = t.strategy.accelerator.save_state

    def full_disk(path):
        if path.endswith("step_000008"):
            raise OSError(28, "No space left on device")
        return real(path)

    t.strategy.accelerator.save_state = full_disk
    with pytest.raises(PipelineError, match=r"No space left on device.*step_000004 is intact"):
        t.fit()
    assert (tmp_path / "checkpoints/step_000004").is_dir() and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert restored_step(make_trainer(tmp_path)) == 4


def test_checkpoint_holding_pickled_code_is_refused(tmp_path):
    from pipeline.artifacts import list_files

    t = make_trainer(tmp_path)
    t.fit()
    ckpt = tmp_path / "checkpoints/step_000008"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(ckpt / "optimizer.bin", "wb") as f:
        pickle.dump(Payload(), f)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    files = list_files(ckpt)
    files.pop("trainer_state.json")
    state["files"] = files  # a consistent, deliberately malicious checkpoint
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(PipelineError, match="refused to load"):
        restored_step(make_trainer(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_nonfinite_steps_are_skipped_up_to_the_budget(tmp_path):
    t = make_trainer(tmp_path, skip_nonfinite=2, eval_every=0)
    nan_at(t, {2, 5})
    assert t.fit()["skipped_steps"] == 2
    got = losses(t)
    assert all(v == v for i, v in enumerate(got) if i not in (2, 5))  # the rest trained normally
    t2 = make_trainer(tmp_path / "b", skip_nonfinite=1, eval_every=0)
    nan_at(t2, {2, 5})
    with pytest.raises(
        PipelineError, match=r"loss nan at step 6 is not finite; the last good checkpoint is .*step_000004"
    ):
        t2.fit()


def test_second_process_on_the_same_run_is_refused(tmp_path, text_corpus):
    run_cli(*pretrain_args(text_corpus, "l", "stage=prepare"), cwd=tmp_path)
    first = start_cli(pretrain_args(text_corpus, "l", "train.max_steps=400", "train.eval_every=0"), tmp_path)
    lock = tmp_path / "runs/l/.lock"
    wait_for(lambda: (tmp_path / "runs/l/pretrain/metrics.jsonl").exists())
    second = run_cli(*pretrain_args(text_corpus, "l"), cwd=tmp_path, check=False)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert_clear_error(second, "is in use by pipeline process", str(first.pid))
    assert not lock.exists()  # released on exit


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, text_corpus):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "runs/d/.lock"
    lock.parent.mkdir(parents=True)
    import socket

    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    proc = run_cli(*pretrain_args(text_corpus, "d", "stage=tokenizer"), cwd=tmp_path)
    assert "taking over" in proc.stderr and not lock.exists()


@pytest.mark.parametrize("skip_nonfinite, fused", [(0, False), (1, False), (0, True)])
def test_an_fp16_overflow_is_a_skipped_step_not_an_error(tmp_path, monkeypatch, skip_nonfinite, fused):
    """fp16 training on a GPU scales the loss; a step whose gradients overflow is skipped by the
    scaler, which halves its scale. A real GradScaler (on CPU here) and a faked overflow; the fused
    AdamW of GPUs skips inside its kernel, where accelerate does not see it."""
    import pipeline.train.strategy as strategy_module
    from pipeline.train.optim import make_optimizer
    from pipeline.train.strategy import Strategy

    monkeypatch.setattr(
        strategy_module,
        "make_optimizer",
        lambda model, spec, _, sharded, muon_dtype: make_optimizer(model, spec, fused, sharded, muon_dtype),
    )
    original = Strategy.__init__

    def with_scaler(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    monkeypatch.setattr(Strategy, "__init__", with_scaler)
    t = make_trainer(tmp_path, eval_every=0, skip_nonfinite=skip_nonfinite, micro_batch_size=8)
    calls = {"n": 0}

    def overflow_on_step_3(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 4 else grad  # one micro-batch per step here

    assert t.layout.accum == 1
    t.unwrapped_model.get_input_embeddings().weight.register_hook(overflow_on_step_3)
    summary = t.fit()
    assert summary["fp16_overflow_steps"] == 1 and summary["skipped_steps"] == 0 and summary["steps"] == 8
    assert t.strategy.accelerator.scaler.get_scale() == 2.0**9  # lowered once, never raised in 8 steps
    assert all(math.isfinite(v) for v in losses(t))


def test_fp16_overflowing_at_every_scale_is_an_error(tmp_path, monkeypatch):
    from pipeline.train import loop
    from pipeline.train.strategy import Strategy

    original = Strategy.__init__

    def with_scaler(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)

    monkeypatch.setattr(Strategy, "__init__", with_scaler)
    monkeypatch.setattr(loop, "MAX_OVERFLOWS_IN_A_ROW", 3)
    t = make_trainer(tmp_path, eval_every=0, micro_batch_size=8, max_steps=8)
    t.unwrapped_model.get_input_embeddings().weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(PipelineError, match="overflowed 3 steps in a row"):
        t.fit()
