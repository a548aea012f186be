"""Extending a finished run: a wsd run resumes before its old cooldown and equals a longer run;
cosine continues from its newest checkpoint; only math changes the checkpoint fingerprint;
pruning only touches the run's own checkpoints."""

import json
import logging

import numpy as np
import pytest
import torch

from pipeline.config.train import TrainSpec, math_only
from tests.conftest import TINY, run_cli
from tests.trainer_helpers import losses, make_trainer, weights

WSD = {"decay": "wsd", "warmup_steps": 2, "ckpt_every": 10, "eval_every": 10}


def test_extending_a_wsd_run_redoes_its_cooldown_and_equals_the_longer_run(tmp_path):
    straight = make_trainer(tmp_path / "straight", max_steps=30, **WSD)
    straight.fit()
    make_trainer(tmp_path / "run", max_steps=20, **WSD).fit()  # cooldown from step 16: checkpointed there
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == [
        "step_000010",
        "step_000016",
        "step_000020",
    ]

    extended = make_trainer(tmp_path / "run", max_steps=30, **WSD)
    assert extended.fit()["start_step"] == 16
    np.testing.assert_allclose(losses(extended), losses(straight), rtol=0, atol=1e-6)
    for k, v in weights(straight).items():
        torch.testing.assert_close(weights(extended)[k], v, rtol=0, atol=1e-6)
    state = json.loads((tmp_path / "run/checkpoints/step_000030/trainer_state.json").read_text())
    assert state["schedule_steps"] == 30


def test_the_cooldown_checkpoint_survives_pruning_so_a_long_wsd_run_extends(tmp_path):
    make_trainer(tmp_path / "run", max_steps=60, keep_checkpoints=2, **WSD).fit()  # cooldown from 48
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["step_000048", "step_000050", "step_000060"]
    extended = make_trainer(tmp_path / "run", max_steps=100, keep_checkpoints=2, **WSD)
    assert extended.fit()["start_step"] == 48
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*"))
    assert names == ["step_000080", "step_000090", "step_000100"]  # the old cooldown's set aside, the new one's kept
    aside = sorted(p.name.split(".")[0] for p in (tmp_path / "run/checkpoints/superseded").iterdir())
    assert aside == ["step_000050", "step_000060"]  # past the resumed 48: another schedule, kept, not deleted


def test_a_shorter_cosine_run_or_another_budget_starts_over_and_says_so(tmp_path, caplog):
    make_trainer(tmp_path / "a", max_steps=12).fit()  # checkpoints 8 and 12, both past the shorter run's decay
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert make_trainer(tmp_path / "a", max_steps=8).fit()["start_step"] == 0
    assert "kept step_000008, step_000012 (trained on another schedule" in caplog.text
    assert "which starts over" in caplog.text and "rm -r" in caplog.text
    assert len(list((tmp_path / "a/checkpoints/superseded").iterdir())) == 2

    budget = {"max_steps": 400, "warmup_steps": 3, "ckpt_every": 0, "eval_every": 0}
    first = make_trainer(tmp_path / "b", time_budget="2s", **budget)
    first.fit()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert make_trainer(tmp_path / "b", time_budget="3s", **budget).fit()["start_step"] == 0
    assert "which starts over" in caplog.text


def test_extending_a_cosine_run_continues_from_its_newest_checkpoint_and_says_how_it_differs(tmp_path, caplog):
    make_trainer(tmp_path, max_steps=8).fit()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert make_trainer(tmp_path, max_steps=12).fit()["start_step"] == 8
    assert "not the run a straight 12 steps would be" in caplog.text and "train.decay=wsd" in caplog.text


def test_pruning_keeps_other_configs_checkpoints_and_this_runs_fresh_ones(tmp_path):
    make_trainer(tmp_path, max_steps=12, ckpt_every=4).fit()  # leaves step 8 and 12 of fingerprint "test"
    other = make_trainer(tmp_path, max_steps=6, ckpt_every=2, lr=1e-3)
    other.job.fingerprint = "another config"
    assert other.fit()["start_step"] == 0
    names = {
        p.name: json.loads((p / "trainer_state.json").read_text())["fingerprint"]
        for p in (tmp_path / "checkpoints").iterdir()
    }
    # Before: pruning by name kept the old run's 8 and 12 and deleted each fresh checkpoint.
    assert names == {
        "step_000004": "another config",
        "step_000006": "another config",
        "step_000008": "test",
        "step_000012": "test",
    }


def test_intervals_step_counts_and_micro_batch_leave_the_checkpoint_fingerprint():
    train = TrainSpec(max_steps=100, log_every=5, eval_every=50, ckpt_every=10, micro_batch_size=4).__dict__
    other = TrainSpec(
        max_steps=300, log_every=1, eval_every=20, ckpt_every=25, micro_batch_size=8, time_budget="5min"
    ).__dict__
    assert math_only({"train": train, "seed": 1}) == math_only({"train": other, "seed": 1})
    assert math_only({"train": train}) != math_only({"train": {**train, "lr": 1e-4}})
    assert math_only({"train": train}) != math_only({"train": {**train, "decay": "wsd"}})


@pytest.mark.slow
def test_raising_max_steps_of_a_finished_wsd_pretrain_resumes_before_its_cooldown(tmp_path, text_corpus):
    args = [
        "stage=pretrain",
        "run.name=x",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "train.decay=wsd",
    ]
    run_cli(*args, cwd=tmp_path)
    run_cli(*args, "train.max_steps=30", "train.log_every=3", "train.eval_every=15", cwd=tmp_path)
    facts = json.loads((tmp_path / "runs/x/pretrain/manifest.json").read_text())["facts"]
    assert facts["resumed_from_step"] == 16 and facts["steps"] == 30


def test_checkpoints_past_step_999999_are_ordered_by_number(tmp_path):
    """step_1000000 sorts before step_999000 as a name: pruning and resume compare numbers."""
    from pipeline.train import checkpoints

    root = tmp_path / "checkpoints"
    root.mkdir()
    for step in (998_000, 999_000, 1_000_000, 1_001_000):
        tmp = root / f".tmp-step_{step}"
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(str(step).encode())
        checkpoints.seal(tmp, checkpoints.step_dir(root, step), {"step": step, "fingerprint": "f"}, keep=2)
    assert [p.name for p in checkpoints.checkpoints_in(root)] == ["step_1000000", "step_1001000"]
    path, state = checkpoints.latest(root, "f")
    assert path.name == "step_1001000" and state["step"] == 1_001_000
    assert checkpoints.peek(root, "f")["step"] == 1_001_000


def test_a_checkpoint_hashes_only_the_files_a_resume_verifies(tmp_path, monkeypatch):
    """Files above the size a resume checksums are recorded by size: a 16 GB base is not hashed."""
    from pipeline import artifacts
    from pipeline.train import checkpoints

    monkeypatch.setattr(checkpoints, "FULL_HASH_LIMIT", 100)
    monkeypatch.setattr(artifacts, "FULL_HASH_LIMIT", 100)
    root, tmp = tmp_path / "checkpoints", tmp_path / "checkpoints/.tmp-step_000004"
    tmp.mkdir(parents=True)
    (tmp / "small.bin").write_bytes(b"s" * 10)
    (tmp / "large.bin").write_bytes(b"l" * 1000)
    checkpoints.seal(tmp, checkpoints.step_dir(root, 4), {"step": 4, "fingerprint": "f"}, keep=2)
    files = checkpoints.state_of(root / "step_000004")["files"]
    assert files["large.bin"] == {"size": 1000, "sha256": None} and len(files["small.bin"]["sha256"]) == 64
    assert checkpoints.latest(root, "f")[1]["step"] == 4
    (root / "step_000004/small.bin").write_bytes(b"x" * 10)  # a damaged verified file still fails
    assert checkpoints.latest(root, "f") is None
